//! The two models of McMahan et al. 2017, as Burn modules, and the trait a model implements to
//! be trained by [`crate::BurnTrainer`].

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

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
