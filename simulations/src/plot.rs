//! Accuracy and loss curves as SVG and PNG (plotters). The PNG text is drawn with DejaVu Sans,
//! bundled in `simulations/assets/` (Bitstream Vera licence, see the file next to it), so that
//! no system font is needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::experiment::RoundMetrics;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    points: &[(f64, f64)],
    target: Option<f64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut lo, mut hi) = points
        .iter()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if let Some(t) = target {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), &BLUE))
        .map_err(err)?;
    if let Some(t) = target {
        chart
            .draw_series(LineSeries::new([(0.0, t), (max_x, t)], &RED.mix(0.6)))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `accuracy.{svg,png}` and `loss.{svg,png}` into `dir`.
pub fn curves(
    dir: &Path,
    name: &str,
    rows: &[RoundMetrics],
    target: Option<f64>,
) -> anyhow::Result<()> {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let acc: Vec<(f64, f64)> = rows.iter().map(|r| (r.round as f64, r.accuracy)).collect();
    let loss: Vec<(f64, f64)> = rows.iter().map(|r| (r.round as f64, r.loss)).collect();
    for (file, what, pts, t) in [
        ("accuracy", "test accuracy", &acc, target),
        ("loss", "test loss", &loss, None),
    ] {
        let title = format!("{name}: {what}");
        let svg = dir.join(format!("{file}.svg"));
        draw(
            SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
            &title,
            what,
            pts,
            t,
        )?;
        let png = dir.join(format!("{file}.png"));
        draw(
            BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
            &title,
            what,
            pts,
            t,
        )?;
    }
    Ok(())
}

/// Several runs' accuracy against the federation's clock (hours) on one chart, written as
/// `<stem>.svg` and `<stem>.png`.
pub fn accuracy_vs_time(
    stem: &Path,
    title: &str,
    runs: &[(String, Vec<(f64, f64)>)],
    target: Option<f64>,
) -> anyhow::Result<()> {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    fn one<DB: DrawingBackend>(
        root: DrawingArea<DB, Shift>,
        title: &str,
        runs: &[(String, Vec<(f64, f64)>)],
        target: Option<f64>,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(err)?;
        let max_x = runs
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .fold(1e-3, f64::max);
        let lo = runs
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .filter(|v| v.is_finite())
            .fold(target.unwrap_or(1.0), f64::min)
            .max(0.8);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_x, lo..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("simulated hours")
            .y_desc("test accuracy")
            .draw()
            .map_err(err)?;
        let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (name, points)) in runs.iter().enumerate() {
            let c = colours.get(i % colours.len()).copied().unwrap_or(BLACK);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c))
                .map_err(err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        if let Some(t) = target {
            chart
                .draw_series(LineSeries::new([(0.0, t), (max_x, t)], BLACK.mix(0.3)))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
        Ok(())
    }
    let svg = stem.with_extension("svg");
    one(
        SVGBackend::new(&svg, (900, 560)).into_drawing_area(),
        title,
        runs,
        target,
    )?;
    let png = stem.with_extension("png");
    one(
        BitMapBackend::new(&png, (900, 560)).into_drawing_area(),
        title,
        runs,
        target,
    )
}
