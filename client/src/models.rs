//! The two models of McMahan et al. 2017, as Burn modules, and the trait a model implements to
//! be trained by [`crate::BurnTrainer`].

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, FloatDType, Tensor};

/// Builds a model whose initial weights are drawn from `seed`, repeatably.
///
/// Burn's device random generator is shared by the whole process, and Burn initializes
/// parameters lazily (at first use), so two threads that seed it and build models interleave
/// their draws. Here seeding, building and drawing every parameter happen under one lock.
/// Every model Flotilla initializes for a seeded run goes through this.
pub fn seeded<M: Module>(device: &Device, seed: u64, make: impl FnOnce(&Device) -> M) -> M {
    struct Materialize;
    impl ModuleVisitor for Materialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Forces the lazy initializer to run now.
            let _ = param.val();
        }
    }
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    device.seed(seed);
    let model = make(device);
    model.visit(&mut Materialize);
    model
}

/// A classifier the trainer can train: flat features in, class logits out.
///
/// Implement this for your own `#[derive(Module)]` struct to train it federatedly.
pub trait Classifier: Module + 'static {
    /// Logits `[batch, classes]` for inputs `[batch, features]`.
    fn forward(&self, input: Tensor<2>) -> Tensor<2>;

    /// Mixed precision: the same logits (returned in f32) with the arithmetic done in `dtype`
    /// (bf16 or f16). The parameters stay f32 (the "master weights" the optimizer updates);
    /// each step casts them to `dtype` on the way in, and the gradients flow back through the
    /// casts to the f32 parameters. The default does the arithmetic in f32: models that do
    /// not implement this train in f32 whatever the precision asked for.
    fn forward_mixed(&self, input: Tensor<2>, dtype: FloatDType) -> Tensor<2> {
        let _ = dtype;
        self.forward(input)
    }

    /// Whether [`Classifier::forward_mixed`] really computes in another precision.
    fn supports_mixed_precision(&self) -> bool {
        false
    }
}

/// `l` applied to `x` with its weights cast to `dtype`.
fn linear_in(l: &Linear, x: Tensor<2>, dtype: FloatDType) -> Tensor<2> {
    linear(
        x,
        l.weight.val().cast(dtype),
        l.bias.as_ref().map(|b| b.val().cast(dtype)),
    )
}

/// `c` (stride 1, "same" padding of a 5x5 kernel, as built in [`Cnn::new`]) applied to `x`
/// with its weights cast to `dtype`.
fn conv_in(c: &Conv2d, x: Tensor<4>, dtype: FloatDType) -> Tensor<4> {
    let pad = [c.kernel_size[0] / 2, c.kernel_size[1] / 2];
    conv2d(
        x,
        c.weight.val().cast(dtype),
        c.bias.as_ref().map(|b| b.val().cast(dtype)),
        ConvOptions::new(c.stride, pad, c.dilation, c.groups),
    )
}

/// The "2NN" of McMahan et al.: a multilayer perceptron with two hidden layers of 200 units
/// and ReLU (784-200-200-10, 199,210 parameters).
#[derive(Module, Debug)]
pub struct Mlp2nn {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    relu: Relu,
}

impl Mlp2nn {
    /// A freshly initialized 2NN on `device` for `inputs` features and `classes` classes.
    pub fn new(inputs: usize, classes: usize, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(inputs, 200).init(device),
            fc2: LinearConfig::new(200, 200).init(device),
            fc3: LinearConfig::new(200, classes).init(device),
            relu: Relu::new(),
        }
    }
}

impl Classifier for Mlp2nn {
    fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let x = self.relu.forward(self.fc1.forward(input));
        let x = self.relu.forward(self.fc2.forward(x));
        self.fc3.forward(x)
    }

    fn forward_mixed(&self, input: Tensor<2>, dtype: FloatDType) -> Tensor<2> {
        let x = self
            .relu
            .forward(linear_in(&self.fc1, input.cast(dtype), dtype));
        let x = self.relu.forward(linear_in(&self.fc2, x, dtype));
        linear_in(&self.fc3, x, dtype).cast(FloatDType::F32)
    }

    fn supports_mixed_precision(&self) -> bool {
        true
    }
}

/// The CNN of McMahan et al.: 5x5 convolution with 32 channels, 2x2 max-pool, 5x5 convolution
/// with 64 channels, 2x2 max-pool, a fully connected layer of 512 units with ReLU, and a
/// softmax output of 10 (1,663,370 parameters on 28x28 inputs; "same" padding).
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
    side: usize,
}

impl Cnn {
    /// A freshly initialized CNN for `side`x`side` single-channel images (side divisible by 4).
    pub fn new(side: usize, classes: usize, device: &Device) -> Self {
        let conv = |cin, cout| {
            Conv2dConfig::new([cin, cout], [5, 5])
                .with_padding(PaddingConfig2d::Explicit(2, 2, 2, 2))
                .init(device)
        };
        let flat = 64 * (side / 4) * (side / 4);
        Self {
            conv1: conv(1, 32),
            conv2: conv(32, 64),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(flat, 512).init(device),
            fc2: LinearConfig::new(512, classes).init(device),
            relu: Relu::new(),
            side,
        }
    }
}

impl Classifier for Cnn {
    fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let [batch, _] = input.dims();
        let x = input.reshape([batch, 1, self.side, self.side]);
        let x = self.pool.forward(self.relu.forward(self.conv1.forward(x)));
        let x = self.pool.forward(self.relu.forward(self.conv2.forward(x)));
        let x = x.flatten::<2>(1, 3);
        let x = self.relu.forward(self.fc1.forward(x));
        self.fc2.forward(x)
    }

    fn forward_mixed(&self, input: Tensor<2>, dtype: FloatDType) -> Tensor<2> {
        let [batch, _] = input.dims();
        let x = input.cast(dtype).reshape([batch, 1, self.side, self.side]);
        let x = self
            .pool
            .forward(self.relu.forward(conv_in(&self.conv1, x, dtype)));
        let x = self
            .pool
            .forward(self.relu.forward(conv_in(&self.conv2, x, dtype)));
        let x = x.flatten::<2>(1, 3);
        let x = self.relu.forward(linear_in(&self.fc1, x, dtype));
        linear_in(&self.fc2, x, dtype).cast(FloatDType::F32)
    }

    fn supports_mixed_precision(&self) -> bool {
        true
    }
}

/// The arithmetic precision of local training. The model received, the master weights and
/// the update sent are f32 in every case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// Forward and backward in bfloat16, f32 master weights.
    Bf16,
    /// Forward and backward in IEEE half precision, f32 master weights.
    F16,
}

impl Precision {
    /// The compute dtype, or `None` for plain f32.
    pub fn dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" | "fp16" => Ok(Precision::F16),
            other => Err(crate::Error::Config(format!(
                "unknown precision {other:?} (expected f32, bf16 or f16)"
            ))),
        }
    }
}

/// The models Flotilla ships, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// [`Mlp2nn`].
    #[serde(rename = "2nn")]
    Mlp2nn,
    /// [`Cnn`].
    Cnn,
}

impl std::str::FromStr for ModelKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "2nn" | "mlp" => Ok(ModelKind::Mlp2nn),
            "cnn" => Ok(ModelKind::Cnn),
            other => Err(crate::Error::Config(format!(
                "unknown model {other:?} (expected 2nn or cnn)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        let d = Device::flex();
        assert_eq!(Mlp2nn::new(784, 10, &d).num_params(), 199_210);
        assert_eq!(Cnn::new(28, 10, &d).num_params(), 1_663_370);
    }

    #[test]
    fn forward_shapes() {
        let d = Device::flex();
        let x = Tensor::<2>::zeros([3, 784], &d);
        assert_eq!(Mlp2nn::new(784, 10, &d).forward(x.clone()).dims(), [3, 10]);
        assert_eq!(Cnn::new(28, 10, &d).forward(x).dims(), [3, 10]);
    }
}
