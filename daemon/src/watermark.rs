//! The visible watermark on the outputs of tiers that carry one (`tiers.<tier>.watermark`,
//! free by default). The runner applies it to each output file before the file is stored or
//! sent to the job's owner, so every copy of a job has the same bytes.
//!
//! The mark is either text (drawn with a public-domain 8×8 bitmap font, white with a dark
//! outline so that it shows on any background, scaled in whole steps so it stays crisp) or an
//! image file, placed in a corner with an opacity, sized as a share of the output's width.
//!
//! PNG, JPEG and WebP outputs are decoded, marked and encoded again in their own format. PNG
//! text chunks (ComfyUI's `prompt` and `workflow`) are kept. Anything else — another format,
//! an animation, a file that does not decode — passes through untouched and is flagged, never
//! lost. This module does no I/O: the image file is read once when the node starts.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use font8x8::UnicodeFonts;
use image::imageops::{self, FilterType};
use image::{ImageFormat, Rgba, RgbaImage};
use serde::Deserialize;

/// `[watermark]`: what the mark looks like. Which tiers get it is `tiers.<tier>.watermark`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkConfig {
    /// The text drawn when no image is given (printable ASCII and Latin-1).
    #[serde(default = "WatermarkConfig::default_text")]
    pub text: String,
    /// An image (PNG, JPEG or WebP; PNG with transparency works best) used instead of the text.
    #[serde(default)]
    pub image_file: Option<PathBuf>,
    #[serde(default)]
    pub corner: Corner,
    /// 0 < opacity ≤ 1.
    #[serde(default = "WatermarkConfig::default_opacity")]
    pub opacity: f32,
    /// The mark's width as a percentage of the output's width, 1..=100.
    #[serde(default = "WatermarkConfig::default_width_pct")]
    pub width_pct: u32,
    /// Distance from the corner as a percentage of the output's shorter side, 0..=25.
    #[serde(default = "WatermarkConfig::default_margin_pct")]
    pub margin_pct: u32,
    /// JPEG quality of re-encoded JPEG outputs, 1..=100.
    #[serde(default = "WatermarkConfig::default_jpeg_quality")]
    pub jpeg_quality: u8,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        WatermarkConfig {
            text: Self::default_text(),
            image_file: None,
            corner: Corner::default(),
            opacity: Self::default_opacity(),
            width_pct: Self::default_width_pct(),
            margin_pct: Self::default_margin_pct(),
            jpeg_quality: Self::default_jpeg_quality(),
        }
    }
}

impl WatermarkConfig {
    fn default_text() -> String {
        "made with Kiln".to_string()
    }
    fn default_opacity() -> f32 {
        0.6
    }
    fn default_width_pct() -> u32 {
        30
    }
    fn default_margin_pct() -> u32 {
        2
    }
    fn default_jpeg_quality() -> u8 {
        90
    }

    /// Checks the values (not the image file: [`Watermark::from_config`] reads that). The
    /// error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((format!("watermark.{key}"), message.to_string()));
        if self.image_file.is_none() {
            if self.text.trim().is_empty() {
                return bad("text", "must not be empty when no image_file is given");
            }
            if self.text.chars().count() > 64 {
                return bad("text", "must be at most 64 characters");
            }
            if let Some(c) = self.text.chars().find(|c| glyph(*c).is_none()) {
                return Err((
                    "watermark.text".to_string(),
                    format!(
                        "the character {c:?} cannot be drawn (printable ASCII and Latin-1 only)"
                    ),
                ));
            }
        }
        if !(self.opacity.is_finite() && self.opacity > 0.0 && self.opacity <= 1.0) {
            return bad("opacity", "must be greater than 0 and at most 1");
        }
        if !(1..=100).contains(&self.width_pct) {
            return bad("width_pct", "must be between 1 and 100");
        }
        if self.margin_pct > 25 {
            return bad("margin_pct", "must be between 0 and 25");
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad("jpeg_quality", "must be between 1 and 100");
        }
        Ok(())
    }
}

/// Which corner of the output the mark sits in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corner {
    TopLeft,
    TopRight,
    BottomLeft,
    #[default]
    BottomRight,
}

/// What happened to one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marked {
    /// The mark was drawn; these are the new bytes.
    Applied(Vec<u8>),
    /// The bytes could not be marked and are kept as they were; the reason says why.
    Skipped(String),
}

/// The mark, ready to draw: its source picture at full resolution.
#[derive(Debug, Clone)]
pub struct Watermark {
    /// White-on-outline text, one unit per font pixel (scaled up in whole steps), or the image.
    source: RgbaImage,
    /// Text is scaled with nearest neighbour (crisp pixels), an image with a smooth filter.
    pixel_art: bool,
    corner: Corner,
    opacity: f32,
    width_pct: u32,
    margin_pct: u32,
    jpeg_quality: u8,
}

/// Outputs larger than this (pixels) pass through unmarked rather than take the memory.
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

impl Watermark {
    /// Builds the mark, reading `image_file` when one is configured. The error names the key.
    pub fn from_config(config: &WatermarkConfig) -> Result<Watermark, (String, String)> {
        config.validate()?;
        let (source, pixel_art) = match &config.image_file {
            Some(path) => (load_image(path)?, false),
            None => (render_text(&config.text), true),
        };
        Ok(Watermark {
            source,
            pixel_art,
            corner: config.corner,
            opacity: config.opacity,
            width_pct: config.width_pct,
            margin_pct: config.margin_pct,
            jpeg_quality: config.jpeg_quality,
        })
    }

    /// Marks one output file. CPU-bound (decode, draw, encode): call it off the async runtime.
    pub fn apply(&self, bytes: &[u8]) -> Marked {
        let format = match image::guess_format(bytes) {
            Ok(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => format,
            Ok(other) => {
                return Marked::Skipped(format!(
                    "{} images are not watermarked",
                    other.extensions_str().first().copied().unwrap_or("these")
                ));
            }
            Err(_) => return Marked::Skipped("not a PNG, JPEG or WebP image".to_string()),
        };
        let result = match format {
            ImageFormat::Png => self.apply_png(bytes),
            ImageFormat::Jpeg => self.apply_jpeg(bytes),
            _ => self.apply_webp(bytes),
        };
        match result {
            Ok(bytes) => Marked::Applied(bytes),
            Err(reason) => Marked::Skipped(reason),
        }
    }

    fn apply_png(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut decoder = png::Decoder::new(Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder
            .read_info()
            .map_err(|e| format!("the PNG does not decode: {e}"))?;
        if reader.info().animation_control.is_some() {
            return Err("animated PNGs are not watermarked".to_string());
        }
        let (width, height) = reader.info().size();
        check_size(width, height)?;
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| "the PNG is too large to decode".to_string())?;
        let mut buf = vec![0; size];
        let frame = reader
            .next_frame(&mut buf)
            .map_err(|e| format!("the PNG does not decode: {e}"))?;
        let (color, _) = reader.output_color_type();
        let mut rgba = to_rgba(&buf[..frame.buffer_size()], color, width, height)?;
        // Text chunks after the image data are only known once the file is read to its end.
        reader
            .finish()
            .map_err(|e| format!("the PNG does not decode: {e}"))?;
        let info = reader.info();
        let has_alpha = matches!(color, png::ColorType::Rgba | png::ColorType::GrayscaleAlpha);
        self.draw(&mut rgba);

        let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_depth(png::BitDepth::Eight);
        let pixels = if has_alpha {
            encoder.set_color(png::ColorType::Rgba);
            rgba.into_raw()
        } else {
            encoder.set_color(png::ColorType::Rgb);
            image::DynamicImage::ImageRgba8(rgba).into_rgb8().into_raw()
        };
        let encode_error = |e: png::EncodingError| format!("the marked PNG does not encode: {e}");
        for chunk in &info.uncompressed_latin1_text {
            encoder
                .add_text_chunk(chunk.keyword.clone(), chunk.text.clone())
                .map_err(encode_error)?;
        }
        for chunk in &info.compressed_latin1_text {
            let text = chunk
                .get_text()
                .map_err(|e| format!("a zTXt chunk does not decode: {e}"))?;
            encoder
                .add_ztxt_chunk(chunk.keyword.clone(), text)
                .map_err(encode_error)?;
        }
        for chunk in &info.utf8_text {
            let text = chunk
                .get_text()
                .map_err(|e| format!("an iTXt chunk does not decode: {e}"))?;
            encoder
                .add_itxt_chunk(chunk.keyword.clone(), text)
                .map_err(encode_error)?;
        }
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer.write_image_data(&pixels).map_err(encode_error)?;
        writer.finish().map_err(encode_error)?;
        Ok(out)
    }

    fn apply_jpeg(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let image = image::load_from_memory_with_format(bytes, ImageFormat::Jpeg)
            .map_err(|e| format!("the JPEG does not decode: {e}"))?;
        check_size(image.width(), image.height())?;
        let mut rgba = image.into_rgba8();
        self.draw(&mut rgba);
        let rgb = image::DynamicImage::ImageRgba8(rgba).into_rgb8();
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, self.jpeg_quality)
            .encode_image(&rgb)
            .map_err(|e| format!("the marked JPEG does not encode: {e}"))?;
        Ok(out)
    }

    fn apply_webp(&self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
            .map_err(|e| format!("the WebP does not decode: {e}"))?;
        if decoder.has_animation() {
            return Err("animated WebP images are not watermarked".to_string());
        }
        let image = image::DynamicImage::from_decoder(decoder)
            .map_err(|e| format!("the WebP does not decode: {e}"))?;
        check_size(image.width(), image.height())?;
        let mut rgba = image.into_rgba8();
        self.draw(&mut rgba);
        // The image crate writes lossless WebP only: the marked file may be larger.
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .encode(
                rgba.as_raw(),
                rgba.width(),
                rgba.height(),
                image::ExtendedColorType::Rgba8,
            )
            .map_err(|e| format!("the marked WebP does not encode: {e}"))?;
        Ok(out)
    }

    /// Draws the mark onto `target` in place.
    fn draw(&self, target: &mut RgbaImage) {
        let (tw, th) = target.dimensions();
        let margin = (u64::from(tw.min(th)) * u64::from(self.margin_pct) / 100) as u32;
        let room_w = tw.saturating_sub(2 * margin).max(1);
        let room_h = th.saturating_sub(2 * margin).max(1);
        let want_w = ((u64::from(tw) * u64::from(self.width_pct) / 100) as u32).clamp(1, room_w);
        let (sw, sh) = self.source.dimensions();
        let mark = if self.pixel_art {
            // Whole steps keep the font's pixels square. The text is never drawn smaller than
            // its font (it would not be legible) unless the output itself is smaller.
            let step = (want_w / sw).max(1).min(room_w / sw).min(room_h / sh);
            if step >= 1 {
                imageops::resize(&self.source, sw * step, sh * step, FilterType::Nearest)
            } else {
                let (w, h) = fit(sw, sh, want_w, room_h);
                imageops::resize(&self.source, w, h, FilterType::Triangle)
            }
        } else {
            let (w, h) = fit(sw, sh, want_w, room_h);
            imageops::resize(&self.source, w, h, FilterType::Lanczos3)
        };
        let (mw, mh) = mark.dimensions();
        let x = match self.corner {
            Corner::TopLeft | Corner::BottomLeft => margin,
            Corner::TopRight | Corner::BottomRight => tw.saturating_sub(margin + mw),
        };
        let y = match self.corner {
            Corner::TopLeft | Corner::TopRight => margin,
            Corner::BottomLeft | Corner::BottomRight => th.saturating_sub(margin + mh),
        };
        for (mx, my, pixel) in mark.enumerate_pixels() {
            let (px, py) = (x + mx, y + my);
            if px >= tw || py >= th {
                continue;
            }
            let alpha = f32::from(pixel[3]) / 255.0 * self.opacity;
            if alpha <= 0.0 {
                continue;
            }
            let base = target.get_pixel_mut(px, py);
            for c in 0..3 {
                let blended = f32::from(pixel[c]) * alpha + f32::from(base[c]) * (1.0 - alpha);
                base[c] = blended.round().clamp(0.0, 255.0) as u8;
            }
            // The output's own transparency is kept where it is more opaque than the mark.
            let mark_alpha = (alpha * 255.0).round() as u8;
            base[3] = base[3].max(mark_alpha);
        }
    }
}

/// The largest size with the source's aspect ratio inside `max_w` × `max_h` (at least 1×1).
fn fit(sw: u32, sh: u32, max_w: u32, max_h: u32) -> (u32, u32) {
    let scale = (f64::from(max_w) / f64::from(sw)).min(f64::from(max_h) / f64::from(sh));
    let w = (f64::from(sw) * scale).floor().max(1.0) as u32;
    let h = (f64::from(sh) * scale).floor().max(1.0) as u32;
    (w, h)
}

fn check_size(width: u32, height: u32) -> Result<(), String> {
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(format!(
            "{width}×{height} is larger than the {MAX_PIXELS} pixels the watermark handles"
        ));
    }
    Ok(())
}

/// Converts a decoded 8-bit PNG frame to RGBA.
fn to_rgba(
    buf: &[u8],
    color: png::ColorType,
    width: u32,
    height: u32,
) -> Result<RgbaImage, String> {
    let pixels = (width as usize) * (height as usize);
    let rgba: Vec<u8> = match color {
        png::ColorType::Rgba => buf.to_vec(),
        png::ColorType::Rgb => buf
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        png::ColorType::GrayscaleAlpha => buf
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g, 255]).collect(),
        png::ColorType::Indexed => {
            return Err("the PNG's palette was not expanded".to_string());
        }
    };
    if rgba.len() != pixels * 4 {
        return Err("the PNG's image data is shorter than its size".to_string());
    }
    RgbaImage::from_raw(width, height, rgba)
        .ok_or_else(|| "the PNG's image data does not match its size".to_string())
}

/// The 8×8 glyph of `c`, if the font has one.
fn glyph(c: char) -> Option<[u8; 8]> {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
}

/// The text as white glyphs with a one-pixel dark outline, one unit per font pixel.
fn render_text(text: &str) -> RgbaImage {
    const PAD: u32 = 1;
    let chars: Vec<[u8; 8]> = text.chars().filter_map(glyph).collect();
    let width = (chars.len() as u32).max(1) * 8 + 2 * PAD;
    let height = 8 + 2 * PAD;
    let mut ink = vec![false; (width * height) as usize];
    for (i, rows) in chars.iter().enumerate() {
        for (row, bits) in rows.iter().enumerate() {
            for bit in 0..8u32 {
                if bits & (1 << bit) != 0 {
                    let x = PAD + i as u32 * 8 + bit;
                    let y = PAD + row as u32;
                    ink[(y * width + x) as usize] = true;
                }
            }
        }
    }
    let at = |x: i64, y: i64| -> bool {
        x >= 0
            && y >= 0
            && (x as u32) < width
            && (y as u32) < height
            && ink[(y as u32 * width + x as u32) as usize]
    };
    RgbaImage::from_fn(width, height, |x, y| {
        let (xi, yi) = (i64::from(x), i64::from(y));
        if at(xi, yi) {
            return Rgba([255, 255, 255, 255]);
        }
        let near = (-1..=1).any(|dy| (-1..=1).any(|dx| at(xi + dx, yi + dy)));
        if near {
            Rgba([0, 0, 0, 200])
        } else {
            Rgba([0, 0, 0, 0])
        }
    })
}

fn load_image(path: &Path) -> Result<RgbaImage, (String, String)> {
    let key = "watermark.image_file".to_string();
    let bytes =
        std::fs::read(path).map_err(|e| (key.clone(), format!("{}: {e}", path.display())))?;
    let image = image::load_from_memory(&bytes).map_err(|e| {
        (
            key.clone(),
            format!("{}: not a PNG, JPEG or WebP image: {e}", path.display()),
        )
    })?;
    if image.width() == 0 || image.height() == 0 {
        return Err((key, format!("{}: the image is empty", path.display())));
    }
    Ok(image.into_rgba8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid_png(width: u32, height: u32, rgb: [u8; 3], texts: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, text) in texts {
            encoder
                .add_text_chunk(key.to_string(), text.to_string())
                .expect("text chunk");
        }
        let mut writer = encoder.write_header().expect("header");
        let data: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
        writer.write_image_data(&data).expect("data");
        writer.finish().expect("finish");
        out
    }

    fn mark() -> Watermark {
        Watermark::from_config(&WatermarkConfig::default()).expect("mark")
    }

    fn applied(marked: Marked) -> Vec<u8> {
        match marked {
            Marked::Applied(bytes) => bytes,
            Marked::Skipped(reason) => panic!("skipped: {reason}"),
        }
    }

    /// How many pixels differ from `rgb`, and their bounding box.
    fn changed(image: &RgbaImage, rgb: [u8; 3]) -> (usize, (u32, u32, u32, u32)) {
        let mut count = 0;
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, p) in image.enumerate_pixels() {
            if [p[0], p[1], p[2]] != rgb {
                count += 1;
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
        (count, (x0, y0, x1, y1))
    }

    #[test]
    fn a_png_gets_a_visible_mark_in_its_corner_and_keeps_its_text_chunks() {
        let original = solid_png(512, 384, [40, 90, 160], &[("prompt", "{\"3\": {}}")]);
        let marked = applied(mark().apply(&original));
        assert_ne!(marked, original);
        let decoded = image::load_from_memory(&marked)
            .expect("decodes")
            .into_rgba8();
        assert_eq!(decoded.dimensions(), (512, 384));
        let (count, (x0, y0, x1, y1)) = changed(&decoded, [40, 90, 160]);
        // A real mark: hundreds of pixels, all in the bottom-right part, inside the margin.
        assert!(count > 500, "only {count} pixels changed");
        assert!(x0 >= 512 / 2 && y0 >= 384 / 2, "mark starts at {x0},{y0}");
        let margin = 384 * 2 / 100;
        assert!(
            x1 < 512 - margin && y1 < 384 - margin,
            "mark ends at {x1},{y1}"
        );
        // The mark is about 30 % of the width.
        let width = x1 - x0 + 1;
        assert!((100..=160).contains(&width), "mark width {width}");

        let reader = png::Decoder::new(Cursor::new(&marked))
            .read_info()
            .expect("png");
        let texts: Vec<(String, String)> = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|c| (c.keyword.clone(), c.text.clone()))
            .collect();
        assert_eq!(
            texts,
            vec![("prompt".to_string(), "{\"3\": {}}".to_string())]
        );
    }

    #[test]
    fn the_mark_is_the_same_for_the_same_input() {
        let original = solid_png(256, 256, [200, 200, 200], &[]);
        assert_eq!(mark().apply(&original), mark().apply(&original));
    }

    #[test]
    fn corners_and_opacity_are_honoured() {
        let original = solid_png(400, 300, [0, 0, 0], &[]);
        let config = WatermarkConfig {
            corner: Corner::TopLeft,
            opacity: 1.0,
            ..WatermarkConfig::default()
        };
        let top_left = Watermark::from_config(&config).expect("mark");
        let decoded = image::load_from_memory(&applied(top_left.apply(&original)))
            .expect("decodes")
            .into_rgba8();
        let (_, (x0, y0, x1, y1)) = changed(&decoded, [0, 0, 0]);
        assert!(x1 < 200 && y1 < 150, "mark at {x0},{y0}..{x1},{y1}");
        // Fully opaque white text on black: some pixels are pure white.
        assert!(decoded.pixels().any(|p| p.0 == [255, 255, 255, 255]));

        let faint = Watermark::from_config(&WatermarkConfig {
            opacity: 0.2,
            ..config
        })
        .expect("mark");
        let decoded = image::load_from_memory(&applied(faint.apply(&original)))
            .expect("decodes")
            .into_rgba8();
        let brightest = decoded.pixels().map(|p| p[0]).max().unwrap_or(0);
        assert!((40..=60).contains(&brightest), "brightest {brightest}");
    }

    #[test]
    fn jpeg_and_webp_are_marked_in_their_own_format() {
        let rgb = image::RgbImage::from_pixel(320, 240, image::Rgb([30, 120, 60]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&rgb)
            .expect("jpeg");
        let marked = applied(mark().apply(&jpeg));
        assert_eq!(
            image::guess_format(&marked).expect("format"),
            ImageFormat::Jpeg
        );
        let before = image::load_from_memory(&jpeg).expect("jpeg").into_rgb8();
        let after = image::load_from_memory(&marked).expect("jpeg").into_rgb8();
        let differing = before
            .pixels()
            .zip(after.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 40))
            .count();
        assert!(differing > 300, "{differing} pixels changed clearly");

        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(rgb.as_raw(), 320, 240, image::ExtendedColorType::Rgb8)
            .expect("webp");
        let marked = applied(mark().apply(&webp));
        assert_eq!(
            image::guess_format(&marked).expect("format"),
            ImageFormat::WebP
        );
        let after = image::load_from_memory(&marked).expect("webp").into_rgb8();
        assert!(
            changed(
                &image::DynamicImage::ImageRgb8(after).into_rgba8(),
                [30, 120, 60]
            )
            .0 > 300
        );
    }

    #[test]
    fn what_cannot_be_marked_passes_through_with_a_reason() {
        let m = mark();
        assert!(
            matches!(m.apply(b"not an image at all"), Marked::Skipped(r) if r.contains("not a PNG"))
        );
        let mut truncated = solid_png(64, 64, [1, 2, 3], &[]);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(m.apply(&truncated), Marked::Skipped(r) if r.contains("does not decode")));
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(matches!(m.apply(gif), Marked::Skipped(r) if r.contains("gif")));
    }

    #[test]
    fn a_tiny_output_still_gets_a_mark_that_fits() {
        let original = solid_png(24, 16, [0, 0, 0], &[]);
        let decoded = image::load_from_memory(&applied(mark().apply(&original)))
            .expect("decodes")
            .into_rgba8();
        assert_eq!(decoded.dimensions(), (24, 16));
        assert!(changed(&decoded, [0, 0, 0]).0 > 0);
    }

    #[test]
    fn an_image_mark_is_read_from_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("logo.png");
        let logo = RgbaImage::from_pixel(40, 20, Rgba([255, 0, 0, 255]));
        logo.save(&path).expect("save");
        let m = Watermark::from_config(&WatermarkConfig {
            image_file: Some(path),
            opacity: 1.0,
            ..WatermarkConfig::default()
        })
        .expect("mark");
        let original = solid_png(200, 200, [0, 0, 255], &[]);
        let decoded = image::load_from_memory(&applied(m.apply(&original)))
            .expect("decodes")
            .into_rgba8();
        // 30 % of 200 = 60 wide, 30 high, red, in the bottom-right corner.
        let red = decoded.pixels().filter(|p| p.0 == [255, 0, 0, 255]).count();
        assert!((1400..=1900).contains(&red), "{red} red pixels");

        let missing = Watermark::from_config(&WatermarkConfig {
            image_file: Some(dir.path().join("nope.png")),
            ..WatermarkConfig::default()
        });
        assert!(matches!(missing, Err((key, _)) if key == "watermark.image_file"));
        std::fs::write(dir.path().join("bad.png"), b"garbage").expect("write");
        let bad = Watermark::from_config(&WatermarkConfig {
            image_file: Some(dir.path().join("bad.png")),
            ..WatermarkConfig::default()
        });
        assert!(
            matches!(bad, Err((key, message)) if key == "watermark.image_file" && message.contains("not a PNG"))
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            (
                WatermarkConfig {
                    text: " ".into(),
                    ..WatermarkConfig::default()
                },
                "watermark.text",
            ),
            (
                WatermarkConfig {
                    text: "日本".into(),
                    ..WatermarkConfig::default()
                },
                "watermark.text",
            ),
            (
                WatermarkConfig {
                    opacity: 0.0,
                    ..WatermarkConfig::default()
                },
                "watermark.opacity",
            ),
            (
                WatermarkConfig {
                    opacity: f32::NAN,
                    ..WatermarkConfig::default()
                },
                "watermark.opacity",
            ),
            (
                WatermarkConfig {
                    width_pct: 0,
                    ..WatermarkConfig::default()
                },
                "watermark.width_pct",
            ),
            (
                WatermarkConfig {
                    margin_pct: 30,
                    ..WatermarkConfig::default()
                },
                "watermark.margin_pct",
            ),
            (
                WatermarkConfig {
                    jpeg_quality: 0,
                    ..WatermarkConfig::default()
                },
                "watermark.jpeg_quality",
            ),
        ];
        for (config, key) in cases {
            assert!(
                matches!(config.validate(), Err((k, _)) if k == key),
                "{key}"
            );
        }
        assert!(WatermarkConfig::default().validate().is_ok());
        assert!(
            WatermarkConfig {
                text: "Café ©".into(),
                ..WatermarkConfig::default()
            }
            .validate()
            .is_ok()
        );
    }
}
