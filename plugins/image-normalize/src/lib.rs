//! Image normalisation: u8 HWC/NHWC in, f32 NCHW out.
//!
//! Each selected input tensor of dtype `u8` and shape `[H, W, C]` or
//! `[N, H, W, C]` becomes an `f32` tensor of the same name and shape
//! `[N, C, H, W]` (`N` = 1 for a 3-D input), each value computed as
//! `(pixel * scale - mean[c]) / std[c]`.
//!
//! Configuration:
//!
//! - `mean`: per-channel means, comma-separated, e.g. `0.485,0.456,0.406`;
//!   one value applies to every channel. Default `0`.
//! - `std`: per-channel standard deviations, same format, none zero.
//!   Default `1`.
//! - `scale`: factor applied to the raw pixel first. Default `1/255`, so
//!   that mean and std are in the 0..1 range as most vision models expect.
//! - `inputs`: comma-separated names of the tensors to convert; each must be
//!   present. Unset means every `u8` tensor of rank 3 or 4. Other tensors
//!   pass through unchanged.
//!
//! The postprocess side passes tensors through unchanged.

use plinth_plugin_sdk::prelude::*;

struct ImageNormalize {
    inputs: Option<Vec<String>>,
    scale: f32,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Plugin for ImageNormalize {
    fn init(config: &Config) -> Result<Self> {
        let scale = config.parse_or("scale", 1.0 / 255.0)?;
        let mean: Vec<f32> = config.parse_list("mean")?.unwrap_or_else(|| vec![0.0]);
        let std: Vec<f32> = config.parse_list("std")?.unwrap_or_else(|| vec![1.0]);
        let inputs = config.parse_list("inputs")?;
        if !f32::is_finite(scale) {
            return Err(PluginError::unavailable(format!(
                "config key `scale`: must be finite, got {scale}"
            )));
        }
        for (key, values) in [("mean", &mean), ("std", &std)] {
            if values.is_empty() {
                return Err(PluginError::unavailable(format!(
                    "config key `{key}`: needs at least one value"
                )));
            }
            if let Some(bad) = values.iter().find(|value| !value.is_finite()) {
                return Err(PluginError::unavailable(format!(
                    "config key `{key}`: values must be finite, got {bad}"
                )));
            }
        }
        if std.contains(&0.0) {
            return Err(PluginError::unavailable(
                "config key `std`: values must not be 0",
            ));
        }
        if mean.len() > 1 && std.len() > 1 && mean.len() != std.len() {
            return Err(PluginError::unavailable(format!(
                "config keys `mean` and `std` give {} and {} channels",
                mean.len(),
                std.len()
            )));
        }
        Ok(ImageNormalize {
            inputs,
            scale,
            mean,
            std,
        })
    }
}

impl Processor for ImageNormalize {
    fn preprocess(&mut self, _req: &RequestInfo, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let names = self.inputs.iter().flatten();
        if let Some(missing) = names
            .into_iter()
            .find(|name| !inputs.iter().any(|tensor| &tensor.name == *name))
        {
            let present: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
            return Err(PluginError::invalid_input(format!(
                "expected an image tensor `{missing}`, got tensors {present:?}"
            )));
        }
        inputs
            .into_iter()
            .map(|tensor| {
                if self.selects(&tensor) {
                    self.normalize(&tensor)
                } else {
                    Ok(tensor)
                }
            })
            .collect()
    }
}

impl ImageNormalize {
    fn selects(&self, tensor: &Tensor) -> bool {
        match &self.inputs {
            Some(names) => names.contains(&tensor.name),
            None => tensor.dtype == Dtype::U8 && matches!(tensor.rank(), 3 | 4),
        }
    }

    fn normalize(&self, tensor: &Tensor) -> Result<Tensor> {
        tensor.expect_dtype(Dtype::U8)?;
        let [n, h, w, c] = match tensor.rank() {
            3 => {
                let [h, w, c] = tensor.dims_n::<3>()?;
                [1, h, w, c]
            }
            4 => tensor.dims_n::<4>()?,
            _ => {
                return Err(TensorError::Rank {
                    tensor: tensor.name.clone(),
                    expected: "3 (HWC) or 4 (NHWC)".to_owned(),
                    shape: tensor.shape.clone(),
                }
                .into());
            }
        };
        for (key, values) in [("mean", &self.mean), ("std", &self.std)] {
            if values.len() > 1 && values.len() != c {
                return Err(PluginError::invalid_input(format!(
                    "tensor `{}`: shape {:?} has {c} channels, config `{key}` has {} values",
                    tensor.name,
                    tensor.shape,
                    values.len()
                )));
            }
        }
        let pixels = tensor.as_u8()?;
        // (p * scale - mean) / std == p * gain + offset, per channel.
        let channel = |values: &[f32], ch: usize| values[if values.len() == 1 { 0 } else { ch }];
        let gains: Vec<f32> = (0..c)
            .map(|ch| self.scale / channel(&self.std, ch))
            .collect();
        let offsets: Vec<f32> = (0..c)
            .map(|ch| -channel(&self.mean, ch) / channel(&self.std, ch))
            .collect();

        let plane = h * w;
        let mut out = vec![0f32; pixels.len()];
        for image_idx in 0..n {
            let src = &pixels[image_idx * plane * c..][..plane * c];
            let dst = &mut out[image_idx * plane * c..][..plane * c];
            for ch in 0..c {
                let (gain, offset) = (gains[ch], offsets[ch]);
                let dst_plane = &mut dst[ch * plane..][..plane];
                for (pixel_idx, value) in dst_plane.iter_mut().enumerate() {
                    *value = f32::from(src[pixel_idx * c + ch]) * gain + offset;
                }
            }
        }
        let shape = [n, c, h, w].map(|dim| dim as i64);
        Ok(Tensor::from_f32(tensor.name.clone(), &shape, out)?)
    }
}

export_processor!(ImageNormalize);

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestInfo {
        RequestInfo {
            id: "1".to_owned(),
            model: "m".to_owned(),
            version: None,
            metadata: Vec::new(),
        }
    }

    fn plugin(pairs: &[(&str, &str)]) -> ImageNormalize {
        ImageNormalize::init(&Config::from_pairs(pairs.iter().copied())).unwrap()
    }

    #[test]
    fn hwc_becomes_nchw_with_per_channel_normalisation() {
        let mut plugin = plugin(&[("scale", "1"), ("mean", "1,2"), ("std", "1,2")]);
        // H=1, W=2, C=2: pixels (10, 20) and (30, 40).
        let image = Tensor::from_u8("image", &[1, 2, 2], vec![10, 20, 30, 40]).unwrap();
        let other = Tensor::from_f32("mask", &[1], vec![7.0]).unwrap();
        let out = plugin
            .preprocess(&request(), vec![image, other.clone()])
            .unwrap();
        assert_eq!(out[0].name, "image");
        assert_eq!(out[0].shape, vec![1, 2, 1, 2]);
        // Channel 0: (10-1)/1, (30-1)/1; channel 1: (20-2)/2, (40-2)/2.
        assert_eq!(&*out[0].as_f32().unwrap(), &[9.0, 29.0, 9.0, 19.0]);
        assert_eq!(out[1], other);
    }

    #[test]
    fn nhwc_batch_and_default_scale() {
        let mut plugin = plugin(&[]);
        let image = Tensor::from_u8("x", &[2, 1, 1, 1], vec![0, 255]).unwrap();
        let out = plugin.preprocess(&request(), vec![image]).unwrap();
        assert_eq!(out[0].shape, vec![2, 1, 1, 1]);
        assert_eq!(&*out[0].as_f32().unwrap(), &[0.0, 1.0]);
    }

    #[test]
    fn precise_errors() {
        let mut plugin = plugin(&[("inputs", "image"), ("mean", "0.5,0.5,0.5")]);
        let wrong_dtype = Tensor::from_f32("image", &[1, 1, 3], vec![0.0; 3]).unwrap();
        let err = plugin
            .preprocess(&request(), vec![wrong_dtype])
            .unwrap_err();
        assert_eq!(err.message(), "tensor `image`: expected dtype u8, got f32");

        let wrong_rank = Tensor::from_u8("image", &[3], vec![0; 3]).unwrap();
        let err = plugin.preprocess(&request(), vec![wrong_rank]).unwrap_err();
        assert_eq!(
            err.message(),
            "tensor `image`: expected rank 3 (HWC) or 4 (NHWC), got shape [3] (rank 1)"
        );

        let wrong_channels = Tensor::from_u8("image", &[1, 1, 4], vec![0; 4]).unwrap();
        let err = plugin
            .preprocess(&request(), vec![wrong_channels])
            .unwrap_err();
        assert_eq!(
            err.message(),
            "tensor `image`: shape [1, 1, 4] has 4 channels, config `mean` has 3 values"
        );

        let err = plugin.preprocess(&request(), vec![]).unwrap_err();
        assert_eq!(
            err.message(),
            "expected an image tensor `image`, got tensors []"
        );
    }

    #[test]
    fn bad_config_is_refused() {
        for (pairs, message) in [
            (
                vec![("std", "1,0")],
                "config key `std`: values must not be 0",
            ),
            (
                vec![("mean", "1,2"), ("std", "1,2,3")],
                "config keys `mean` and `std` give 2 and 3 channels",
            ),
            (
                vec![("mean", "x")],
                "config key `mean`: cannot parse `x` as f32: invalid float literal",
            ),
        ] {
            let err = ImageNormalize::init(&Config::from_pairs(pairs))
                .err()
                .unwrap();
            assert_eq!(err.message(), message);
        }
    }
}
