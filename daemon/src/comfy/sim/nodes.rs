//! The node implementations. Image nodes (EmptyImage, ImageInvert, ImageBlur, ImageScale,
//! GetImageSize, LoadImage, SaveImage, PreviewImage) run for real on 8-bit RGB images; model
//! nodes (loaders, CLIPTextEncode, EmptyLatentImage, KSampler, KSamplerAdvanced, VAEDecode,
//! VAEEncode, LoRA, upscale models) are simulated with the configured timings and produce
//! deterministic pictures of the requested size. Files are written only inside the output and
//! temp directories; a prefix that escapes them is refused like ComfyUI refuses it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use image::{ImageEncoder, Rgb, RgbImage, imageops};
use rand::Rng;
use serde_json::{Value, json};

use super::json::to_py_string;
use super::worker::Exec;

/// A value flowing along a link.
#[derive(Clone, Debug)]
pub enum V {
    Image(Arc<Vec<RgbImage>>),
    Mask {
        width: u32,
        height: u32,
        batch: usize,
    },
    Latent {
        width: u32,
        height: u32,
        batch: usize,
        seed: u64,
    },
    Model(String),
    Clip(String),
    Vae(String),
    Conditioning(u64),
    UpscaleModel {
        name: String,
        scale: u32,
    },
    Int(i64),
    /// A widget value as sent in the prompt.
    Json(Value),
    /// The output of a node class the simulator does not model in detail.
    Opaque(String),
}

/// Why a node did not finish.
#[derive(Debug)]
pub enum NodeError {
    Interrupted,
    Failed {
        exception_type: String,
        message: String,
    },
}

impl NodeError {
    pub fn failed(exception_type: &str, message: impl Into<String>) -> NodeError {
        NodeError::Failed {
            exception_type: exception_type.to_string(),
            message: message.into(),
        }
    }
}

/// What a node produced: its outputs (by slot) and its UI output (for output nodes).
pub struct NodeOutput {
    pub values: Vec<V>,
    pub ui: Option<Value>,
}

/// The resolved inputs of one node.
pub struct Inputs(pub HashMap<String, V>);

impl Inputs {
    fn get(&self, name: &str) -> Result<&V, NodeError> {
        self.0.get(name).ok_or_else(|| {
            NodeError::failed(
                "TypeError",
                format!("missing 1 required positional argument: '{name}'"),
            )
        })
    }

    fn int(&self, name: &str) -> Result<i64, NodeError> {
        match self.get(name)? {
            V::Int(i) => Ok(*i),
            V::Json(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_u64().map(|u| u.min(i64::MAX as u64) as i64))
                .or_else(|| n.as_f64().map(|f| f as i64))
                .ok_or_else(|| bad_type(name, "INT")),
            _ => Err(bad_type(name, "INT")),
        }
    }

    fn u64_or_wrap(&self, name: &str) -> Result<u64, NodeError> {
        match self.get(name)? {
            V::Json(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .or_else(|| n.as_f64().map(|f| f as u64))
                .ok_or_else(|| bad_type(name, "INT")),
            V::Int(i) => Ok(*i as u64),
            _ => Err(bad_type(name, "INT")),
        }
    }

    fn float(&self, name: &str) -> Result<f64, NodeError> {
        match self.get(name)? {
            V::Int(i) => Ok(*i as f64),
            V::Json(Value::Number(n)) => n.as_f64().ok_or_else(|| bad_type(name, "FLOAT")),
            _ => Err(bad_type(name, "FLOAT")),
        }
    }

    fn string(&self, name: &str) -> Result<String, NodeError> {
        match self.get(name)? {
            V::Json(Value::String(s)) => Ok(s.clone()),
            V::Json(v) => Ok(v.to_string()),
            V::Int(i) => Ok(i.to_string()),
            _ => Err(bad_type(name, "STRING")),
        }
    }

    fn image(&self, name: &str) -> Result<Arc<Vec<RgbImage>>, NodeError> {
        match self.get(name)? {
            V::Image(i) => Ok(i.clone()),
            _ => Err(bad_type(name, "IMAGE")),
        }
    }

    fn latent(&self, name: &str) -> Result<(u32, u32, usize, u64), NodeError> {
        match self.get(name)? {
            V::Latent {
                width,
                height,
                batch,
                seed,
            } => Ok((*width, *height, *batch, *seed)),
            _ => Err(bad_type(name, "LATENT")),
        }
    }

    fn name_of(&self, name: &str) -> String {
        match self.0.get(name) {
            Some(V::Model(s) | V::Clip(s) | V::Vae(s)) => s.clone(),
            Some(V::Conditioning(h)) => h.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        }
    }
}

fn bad_type(name: &str, expected: &str) -> NodeError {
    NodeError::failed(
        "TypeError",
        format!("input '{name}' is not a {expected} value in the simulator"),
    )
}

/// FNV-1a, a small stable hash for deterministic simulated outputs.
pub fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Image work of at most this many pixels (in and out together) runs on the event loop: it takes
/// microseconds, less than handing it to a blocking thread and waking the loop again costs.
const INLINE_PIXELS: u64 = 256 * 256;

/// The pixels of a batch of images.
fn pixels(images: &[RgbImage]) -> u64 {
    images
        .iter()
        .map(|i| u64::from(i.width()) * u64::from(i.height()))
        .sum()
}

/// Runs image work of `pixels` pixels: inline when small, else on a blocking thread so the
/// server keeps answering meanwhile.
async fn blocking<T: Send + 'static>(
    pixels: u64,
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    if pixels <= INLINE_PIXELS {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::failed("RuntimeError", format!("image worker failed: {e}")))?
}

/// Runs one node.
pub async fn run(
    ex: &mut Exec<'_>,
    node_id: &str,
    class: &str,
    inputs: &Inputs,
) -> Result<NodeOutput, NodeError> {
    let out = |values: Vec<V>| Ok(NodeOutput { values, ui: None });
    match class {
        "EmptyImage" => {
            let (w, h) = (dim(inputs.int("width")?), dim(inputs.int("height")?));
            let batch = inputs.int("batch_size")?.clamp(1, 4096) as usize;
            let color = inputs.int("color")?;
            let px = Rgb([(color >> 16) as u8, (color >> 8) as u8, color as u8]);
            let size = u64::from(w) * u64::from(h) * batch as u64;
            let imgs = blocking(size, move || {
                Ok(vec![RgbImage::from_pixel(w, h, px); batch])
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        "ImageInvert" => {
            let src = inputs.image("image")?;
            let imgs = blocking(2 * pixels(&src), move || {
                Ok(src
                    .iter()
                    .map(|i| {
                        let mut i = i.clone();
                        imageops::invert(&mut i);
                        i
                    })
                    .collect())
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        "ImageBlur" => {
            let src = inputs.image("image")?;
            let radius = inputs.int("blur_radius")?;
            let sigma = inputs.float("sigma")? as f32;
            if radius <= 0 {
                return out(vec![V::Image(src)]);
            }
            let size = 2 * pixels(&src);
            let imgs = blocking(size, move || {
                Ok(src.iter().map(|i| imageops::fast_blur(i, sigma)).collect())
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        "ImageScale" => {
            let src = inputs.image("image")?;
            let method = inputs.string("upscale_method")?;
            let (w, h) = (inputs.int("width")?, inputs.int("height")?);
            let crop = inputs.string("crop")? == "center";
            // A zero side keeps the aspect ratio: the output's size is not known here.
            let out_pixels = match (u64::try_from(w), u64::try_from(h)) {
                (Ok(w), Ok(h)) if w > 0 && h > 0 => src.len() as u64 * w.min(16384) * h.min(16384),
                _ => u64::MAX,
            };
            let size = pixels(&src).saturating_add(out_pixels);
            let imgs = blocking(size, move || {
                Ok(src.iter().map(|i| scale(i, &method, w, h, crop)).collect())
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        "GetImageSize" => {
            let src = inputs.image("image")?;
            let (w, h) = src.first().map(|i| i.dimensions()).unwrap_or((0, 0));
            let batch = src.len();
            ex.send_text(
                node_id,
                &format!("width: {w}, height: {h}\n batch size: {batch}"),
            );
            out(vec![
                V::Int(i64::from(w)),
                V::Int(i64::from(h)),
                V::Int(batch as i64),
            ])
        }
        "LoadImage" | "LoadImageMask" => {
            let name = inputs.string("image")?;
            let path = input_path(
                &ex.cfg().input_dir,
                &ex.cfg().output_dir,
                &ex.cfg().temp_dir,
                &name,
            );
            // A file of unknown size: always off the event loop.
            let img = blocking(u64::MAX, move || {
                let bytes = std::fs::read(&path).map_err(|e| {
                    NodeError::failed(
                        "FileNotFoundError",
                        format!("[Errno 2] {e}: '{}'", path.display()),
                    )
                })?;
                image::load_from_memory(&bytes)
                    .map(|i| i.to_rgb8())
                    .map_err(|_| {
                        NodeError::failed(
                            "PIL.UnidentifiedImageError",
                            format!("cannot identify image file '{}'", path.display()),
                        )
                    })
            })
            .await?;
            let (width, height) = img.dimensions();
            if class == "LoadImageMask" {
                return out(vec![V::Mask {
                    width,
                    height,
                    batch: 1,
                }]);
            }
            out(vec![
                V::Image(Arc::new(vec![img])),
                V::Mask {
                    width,
                    height,
                    batch: 1,
                },
            ])
        }
        "SaveImage" | "PreviewImage" => {
            let images = inputs.image("images")?;
            let (dir, prefix, kind) = if class == "SaveImage" {
                (
                    ex.cfg().output_dir.clone(),
                    inputs.string("filename_prefix")?,
                    "output",
                )
            } else {
                let suffix: String = {
                    const CHARS: &[u8] = b"abcdefghijklmnopqrstupvxyz";
                    let mut rng = rand::rng();
                    (0..5)
                        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
                        .collect()
                };
                (
                    ex.cfg().temp_dir.clone(),
                    format!("ComfyUI_temp_{suffix}"),
                    "temp",
                )
            };
            let mut texts = vec![("prompt".to_string(), to_py_string(ex.prompt()))];
            if let Some(Value::Object(extra)) = ex.extra_data().get("extra_pnginfo") {
                for (k, v) in extra {
                    texts.push((k.clone(), to_py_string(v)));
                }
            }
            let size = pixels(&images);
            let results = blocking(size, move || {
                save_images(&dir, &prefix, kind, &images, &texts)
            })
            .await?;
            Ok(NodeOutput {
                values: Vec::new(),
                ui: Some(json!({"images": results})),
            })
        }
        "CheckpointLoaderSimple" | "CheckpointLoader" | "ImageOnlyCheckpointLoader" => {
            let name = inputs.string("ckpt_name")?;
            ex.load_model(&name).await;
            out(vec![
                V::Model(name.clone()),
                V::Clip(name.clone()),
                V::Vae(name),
            ])
        }
        "VAELoader" => out(vec![V::Vae(inputs.string("vae_name")?)]),
        "LoraLoader" => {
            let lora = inputs.string("lora_name")?;
            let sm = inputs.float("strength_model")?;
            let sc = inputs.float("strength_clip")?;
            let model = format!("{}+{lora}@{sm}", inputs.name_of("model"));
            let clip = format!("{}+{lora}@{sc}", inputs.name_of("clip"));
            out(vec![V::Model(model), V::Clip(clip)])
        }
        "LoraLoaderModelOnly" => {
            let lora = inputs.string("lora_name")?;
            let sm = inputs.float("strength_model")?;
            out(vec![V::Model(format!(
                "{}+{lora}@{sm}",
                inputs.name_of("model")
            ))])
        }
        "CLIPTextEncode" => {
            let text = inputs.string("text")?;
            out(vec![V::Conditioning(fnv(&[
                &inputs.name_of("clip"),
                &text,
            ]))])
        }
        "EmptyLatentImage" => {
            let (w, h) = (
                dim(inputs.int("width")? / 8),
                dim(inputs.int("height")? / 8),
            );
            let batch = inputs.int("batch_size")?.clamp(1, 4096) as usize;
            out(vec![V::Latent {
                width: w,
                height: h,
                batch,
                seed: 0,
            }])
        }
        "KSampler" | "KSamplerAdvanced" => {
            let (w, h, batch, seed_in) = inputs.latent("latent_image")?;
            let steps = inputs.int("steps")?.max(0) as u64;
            let (seed, ticks) = if class == "KSampler" {
                (inputs.u64_or_wrap("seed")?, steps)
            } else {
                let start = inputs.int("start_at_step")?.max(0) as u64;
                let end = inputs.int("end_at_step")?.max(0) as u64;
                (
                    inputs.u64_or_wrap("noise_seed")?,
                    end.min(steps).saturating_sub(start),
                )
            };
            let step_time = ex.cfg().step_time;
            for i in 1..=ticks {
                ex.progress(node_id, i, ticks, step_time).await?;
            }
            let mixed = fnv(&[
                &inputs.name_of("model"),
                &inputs.name_of("positive"),
                &inputs.name_of("negative"),
                &seed.to_string(),
                &seed_in.to_string(),
                &steps.to_string(),
            ]);
            out(vec![V::Latent {
                width: w,
                height: h,
                batch,
                seed: mixed,
            }])
        }
        "VAEDecode" => {
            let (w, h, batch, seed) = inputs.latent("samples")?;
            ex.sleep_uninterruptible(ex.cfg().vae_time).await;
            let size = u64::from(w) * u64::from(h) * 64 * batch as u64;
            let imgs = blocking(size, move || {
                Ok((0..batch)
                    .map(|b| {
                        synth_image(
                            w.saturating_mul(8),
                            h.saturating_mul(8),
                            seed.wrapping_add(b as u64),
                        )
                    })
                    .collect())
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        "VAEEncode" => {
            let px = inputs.image("pixels")?;
            ex.sleep_uninterruptible(ex.cfg().vae_time).await;
            let (w, h) = px.first().map(|i| i.dimensions()).unwrap_or((8, 8));
            let sample: String = px
                .first()
                .map(|i| {
                    i.as_raw()
                        .iter()
                        .step_by(997)
                        .take(4096)
                        .map(|b| char::from(*b))
                        .collect()
                })
                .unwrap_or_default();
            out(vec![V::Latent {
                width: w / 8,
                height: h / 8,
                batch: px.len(),
                seed: fnv(&[&sample]),
            }])
        }
        "UpscaleModelLoader" => {
            let name = inputs.string("model_name")?;
            let scale = upscale_factor(&name);
            out(vec![V::UpscaleModel { name, scale }])
        }
        "ImageUpscaleWithModel" => {
            let scale = match inputs.get("upscale_model")? {
                V::UpscaleModel { scale, .. } => *scale,
                _ => return Err(bad_type("upscale_model", "UPSCALE_MODEL")),
            };
            let src = inputs.image("image")?;
            let tiles: u64 = src
                .iter()
                .map(|i| {
                    let (w, h) = i.dimensions();
                    u64::from(w.div_ceil(480)) * u64::from(h.div_ceil(480))
                })
                .sum();
            let tile_time = ex.cfg().upscale_tile_time;
            for i in 1..=tiles {
                ex.progress(node_id, i, tiles, tile_time).await?;
            }
            let size = pixels(&src).saturating_mul(1 + u64::from(scale) * u64::from(scale));
            let imgs = blocking(size, move || {
                Ok(src
                    .iter()
                    .map(|i| {
                        let (w, h) = i.dimensions();
                        imageops::resize(i, w * scale, h * scale, imageops::FilterType::Nearest)
                    })
                    .collect())
            })
            .await?;
            out(vec![V::Image(Arc::new(imgs))])
        }
        other => Err(NodeError::failed(
            "NotImplementedError",
            format!("the ComfyUI simulator does not implement node class {other}"),
        )),
    }
}

fn dim(v: i64) -> u32 {
    v.clamp(1, 16384) as u32
}

fn upscale_factor(name: &str) -> u32 {
    let lower = name.to_ascii_lowercase();
    let b = lower.as_bytes();
    for (i, c) in b.iter().enumerate() {
        if *c != b'x' {
            continue;
        }
        let after = b.get(i + 1).filter(|d| d.is_ascii_digit());
        let before = i
            .checked_sub(1)
            .and_then(|j| b.get(j))
            .filter(|d| d.is_ascii_digit());
        if let Some(d) = after.or(before) {
            let f = u32::from(d - b'0');
            if (1..=8).contains(&f) {
                return f;
            }
        }
    }
    4
}

fn scale(img: &RgbImage, method: &str, w: i64, h: i64, crop: bool) -> RgbImage {
    let (ow, oh) = img.dimensions();
    let (mut w, mut h) = (w.clamp(0, 16384) as u32, h.clamp(0, 16384) as u32);
    if w == 0 && h == 0 {
        return img.clone();
    }
    if w == 0 {
        w = ((u64::from(ow) * u64::from(h)) / u64::from(oh.max(1))).max(1) as u32;
    }
    if h == 0 {
        h = ((u64::from(oh) * u64::from(w)) / u64::from(ow.max(1))).max(1) as u32;
    }
    let filter = match method {
        "nearest-exact" => imageops::FilterType::Nearest,
        "bicubic" => imageops::FilterType::CatmullRom,
        "lanczos" => imageops::FilterType::Lanczos3,
        _ => imageops::FilterType::Triangle,
    };
    if crop {
        let old_aspect = f64::from(ow) / f64::from(oh.max(1));
        let new_aspect = f64::from(w) / f64::from(h);
        let (mut x, mut y, mut cw, mut ch) = (0, 0, ow, oh);
        if old_aspect > new_aspect {
            cw = (f64::from(oh) * new_aspect).round().max(1.0) as u32;
            x = (ow - cw.min(ow)) / 2;
        } else if old_aspect < new_aspect {
            ch = (f64::from(ow) / new_aspect).round().max(1.0) as u32;
            y = (oh - ch.min(oh)) / 2;
        }
        let cropped = imageops::crop_imm(img, x, y, cw.min(ow), ch.min(oh)).to_image();
        return imageops::resize(&cropped, w, h, filter);
    }
    imageops::resize(img, w, h, filter)
}

/// A deterministic stand-in for a decoded picture: a smooth two-colour gradient with a
/// seed-dependent pattern.
fn synth_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let a = [
        (seed & 0xff) as f32,
        ((seed >> 8) & 0xff) as f32,
        ((seed >> 16) & 0xff) as f32,
    ];
    let b = [
        ((seed >> 24) & 0xff) as f32,
        ((seed >> 32) & 0xff) as f32,
        ((seed >> 40) & 0xff) as f32,
    ];
    let period = 16 + (seed >> 48) as u32 % 48;
    RgbImage::from_fn(w, h, |x, y| {
        let t = (x + y) as f32 / (w + h).max(1) as f32;
        let stripe = if ((x / period) + (y / period)).is_multiple_of(2) {
            0.9
        } else {
            1.0
        };
        Rgb(std::array::from_fn(|c| {
            ((a[c] * (1.0 - t) + b[c] * t) * stripe) as u8
        }))
    })
}

/// The path of a LoadImage name (`sub/name.png`, optionally annotated ` [input]`, ` [output]`,
/// ` [temp]`).
fn input_path(input: &Path, output: &Path, temp: &Path, name: &str) -> PathBuf {
    let (name, base) = if let Some(n) = name.strip_suffix(" [output]") {
        (n, output)
    } else if let Some(n) = name.strip_suffix(" [temp]") {
        (n, temp)
    } else {
        (name.strip_suffix(" [input]").unwrap_or(name), input)
    };
    base.join(name)
}

/// Python's `os.path.normpath` on a relative or absolute `/`-separated path, lexically.
fn normpath(p: &str) -> String {
    let absolute = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

/// Lexical absolute path (`os.path.abspath`).
fn lexical_abs(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn common_path(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// ComfyUI's `get_save_image_path` plus the PNG writes of SaveImage/PreviewImage.
fn save_images(
    dir: &Path,
    prefix: &str,
    kind: &str,
    images: &[RgbImage],
    texts: &[(String, String)],
) -> Result<Vec<Value>, NodeError> {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let prefix = prefix
        .replace("%width%", &w.to_string())
        .replace("%height%", &h.to_string());
    let norm = normpath(&prefix);
    let (subfolder, filename) = match norm.rsplit_once('/') {
        Some((d, f)) => (
            if d.is_empty() {
                "/".to_string()
            } else {
                d.to_string()
            },
            f.to_string(),
        ),
        None => (String::new(), norm.clone()),
    };
    let dir = lexical_abs(dir);
    let full = lexical_abs(&dir.join(&subfolder));
    let common = common_path(&dir, &full);
    if common != dir {
        return Err(NodeError::failed(
            "Exception",
            format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}\n         commonpath: {}",
                full.display(),
                dir.display(),
                common.display()
            ),
        ));
    }
    std::fs::create_dir_all(&full).map_err(|e| {
        NodeError::failed("OSError", format!("cannot create {}: {e}", full.display()))
    })?;
    let first = claim_counters(&full, &filename, images.len() as u64);
    let mut results = Vec::new();
    for (counter, img) in (first..).zip(images.iter()) {
        let file = format!("{filename}_{counter:05}_.png");
        let png = encode_png(img, texts)?;
        let path = full.join(&file);
        std::fs::write(&path, png).map_err(|e| {
            NodeError::failed("OSError", format!("cannot write {}: {e}", path.display()))
        })?;
        results.push(json!({"filename": file, "subfolder": subfolder, "type": kind}));
    }
    Ok(results)
}

/// The next file counter per (folder, filename prefix), learned from one listing of the folder
/// and counted on from there: ComfyUI lists the folder on every save, which costs a listing of
/// every earlier image per save once thousands are there.
static NEXT_COUNTERS: std::sync::LazyLock<std::sync::Mutex<HashMap<(PathBuf, String), u64>>> =
    std::sync::LazyLock::new(|| std::sync::Mutex::new(HashMap::new()));

/// The first of `count` file counters for `filename` in `dir`, as ComfyUI's
/// `get_save_image_path` would give them (the highest counter there plus one) while only the
/// simulator writes there. A file someone else puts further up is noticed when its name comes
/// up: a name found taken sends it back to listing the folder.
fn claim_counters(dir: &Path, filename: &str, count: u64) -> u64 {
    let mut counters = NEXT_COUNTERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = (dir.to_path_buf(), filename.to_string());
    let taken = |first: u64| {
        (first..first + count).any(|c| dir.join(format!("{filename}_{c:05}_.png")).exists())
    };
    let first = match counters.get(&key) {
        Some(&next) if !taken(next) => next,
        _ => next_counter(dir, filename),
    };
    counters.insert(key, first + count);
    first
}

/// The next file counter for `filename` in `dir`, from the files already there.
fn next_counter(dir: &Path, filename: &str) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 1;
    };
    let prefix_len = filename.chars().count();
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|f| {
            let chars: Vec<char> = f.chars().collect();
            if chars.len() <= prefix_len {
                return None;
            }
            let head: String = chars[..prefix_len].iter().collect();
            if head != filename || chars[prefix_len] != '_' {
                return None;
            }
            let rest: String = chars[prefix_len + 1..].iter().collect();
            let digits = rest
                .split('_')
                .next()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(0);
            Some(digits)
        })
        .max()
        .map_or(1, |m| m + 1)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// Encodes a PNG and inserts a tEXt chunk per (keyword, text) right after IHDR, as ComfyUI
/// stores the prompt in its outputs.
pub fn encode_png(img: &RgbImage, texts: &[(String, String)]) -> Result<Vec<u8>, NodeError> {
    let mut raw = Vec::new();
    image::codecs::png::PngEncoder::new(&mut raw)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| NodeError::failed("OSError", format!("PNG encoding failed: {e}")))?;
    // Signature (8) + IHDR chunk (4 length + 4 type + 13 data + 4 CRC).
    const IHDR_END: usize = 8 + 25;
    if raw.len() < IHDR_END {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(
        raw.len()
            + texts
                .iter()
                .map(|(k, t)| k.len() + t.len() + 13)
                .sum::<usize>(),
    );
    out.extend_from_slice(&raw[..IHDR_END]);
    for (key, text) in texts {
        let mut body = Vec::with_capacity(key.len() + 1 + text.len() + 4);
        body.extend_from_slice(b"tEXt");
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        // tEXt is Latin-1; ComfyUI writes the JSON text, which is ASCII unless the prompt holds
        // other characters. Keep the bytes as they are.
        body.extend_from_slice(text.as_bytes());
        let len = u32::try_from(body.len() - 4).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out.extend_from_slice(&raw[IHDR_END..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn small_image_work_runs_on_the_loop_and_large_work_off_it() {
        let here = std::thread::current().id();
        let thread = |pixels| blocking(pixels, || Ok(std::thread::current().id()));
        assert!(matches!(thread(INLINE_PIXELS).await, Ok(id) if id == here));
        assert!(matches!(thread(INLINE_PIXELS + 1).await, Ok(id) if id != here));
        assert!(matches!(thread(u64::MAX).await, Ok(id) if id != here));
    }

    #[test]
    fn normpath_like_python() {
        assert_eq!(normpath("../escape_attempt"), "../escape_attempt");
        assert_eq!(normpath("a/./b//c"), "a/b/c");
        assert_eq!(normpath("a/../../b"), "../b");
        assert_eq!(normpath("/x/../y"), "/y");
        assert_eq!(normpath("capture_sub/loaded"), "capture_sub/loaded");
    }

    #[test]
    fn escaping_prefix_is_refused_and_counter_continues() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = RgbImage::from_pixel(4, 3, Rgb([1, 2, 3]));
        let save = |prefix: &str, count: usize| {
            save_images(dir.path(), prefix, "output", &vec![img.clone(); count], &[])
        };
        let err = save("../escape", 1);
        assert!(
            matches!(err, Err(NodeError::Failed { ref exception_type, .. }) if exception_type == "Exception")
        );
        let a = save("sub/p", 1).expect("save");
        assert_eq!(a[0]["filename"], "p_00001_.png");
        assert_eq!(a[0]["subfolder"], "sub");
        let b = save("sub/p", 2).expect("save");
        assert_eq!(b[0]["filename"], "p_00002_.png");
        assert_eq!(b[1]["filename"], "p_00003_.png");
        // Files put there by someone else: the counter goes past one when its name comes up.
        std::fs::write(dir.path().join("sub").join("p_00007_.png"), b"x").expect("write");
        let c = save("sub/p", 1).expect("save");
        assert_eq!(c[0]["filename"], "p_00004_.png");
        std::fs::write(dir.path().join("sub").join("p_00005_.png"), b"x").expect("write");
        let d = save("sub/p", 1).expect("save");
        assert_eq!(d[0]["filename"], "p_00008_.png");
    }

    #[test]
    fn png_with_text_chunk_decodes() {
        let img = RgbImage::from_pixel(5, 5, Rgb([9, 8, 7]));
        let png = encode_png(&img, &[("prompt".into(), "{\"1\": {}}".into())]).expect("encode");
        let back = image::load_from_memory(&png).expect("decodes").to_rgb8();
        assert_eq!(back.get_pixel(2, 2), &Rgb([9, 8, 7]));
        assert!(png.windows(11).any(|w| w == b"tEXtprompt\0"));
    }

    #[test]
    fn upscale_factor_from_name() {
        assert_eq!(upscale_factor("tiny_random_compact_x2.safetensors"), 2);
        assert_eq!(upscale_factor("4x-UltraSharp.pth"), 4);
        assert_eq!(upscale_factor("model.pth"), 4);
    }
}
