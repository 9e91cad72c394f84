//! Images in chat messages, as OpenAI's and transformers' content parts carry them:
//!
//! * `{"type": "image_url", "image_url": {"url": URL}}` (OpenAI; `image_url` may also be the URL
//!   string itself);
//! * `{"type": "image", "image": SOURCE}` (transformers), also with `url`, `path` or `base64`
//!   instead of `image`.
//!
//! A URL or source is a `data:` URI (base64), a local path (or `file://` URL), an `http(s)://`
//! URL (fetched only when the engine's settings allow it), or, for `image`, the encoded bytes as
//! a JSON array of integers. Where local paths may point is a setting too (a server should
//! restrict them). Each image is read (within the decode limits), hashed and decoded here, before
//! any model work, and every error names its content part (`messages[1].content[0].image_url`).
//!
//! The messages handed to the chat template keep each image's place as `{"type": "image"}`
//! (what Qwen-VL templates look for), without the data.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pio_image::{DecodeLimits, GridThw, ImageError, ImageHash, ImageInput, ImageProcessor, RgbImage};
use serde_json::{json, Value as Json};

/// Where local image paths (and `file://` URLs) in messages may point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalImageFiles {
    /// Any file the process can read (the default: the caller builds the messages, as `pio run`
    /// does).
    #[default]
    Any,
    /// Files under this folder only (after resolving links and `..`).
    Under(PathBuf),
    /// No local files: images come as data URIs or bytes (a server facing clients it does not
    /// trust with its disk).
    Refused,
}

/// Whether `http://` and `https://` image URLs are fetched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RemoteImages {
    /// Refused with an error naming the content part (the default).
    #[default]
    Refused,
    /// Fetched, at most the decode limits' input bytes, within `timeout` for the whole transfer.
    Fetch { timeout: Duration },
}

/// How the engine takes images: decode limits, where paths and URLs may lead, the encoder
/// cache's size and the threads that preprocess an image.
#[derive(Clone, Debug, Default)]
pub struct ImageSettings {
    pub limits: DecodeLimits,
    pub local_files: LocalImageFiles,
    pub remote: RemoteImages,
    /// Bytes of vision encodings kept across requests (None: the engine's default).
    pub encoder_cache_bytes: Option<u64>,
    /// Threads that resample, normalize and cut one image into patches (None: the engine's
    /// default, the machine's cores up to 8).
    pub preprocess_threads: Option<std::num::NonZeroUsize>,
}

/// A content part the engine cannot take: which part (`messages[1].content[0].image_url`), why,
/// and the cause underneath when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {message}")]
pub struct ContentError {
    pub part: String,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ContentError {
    fn new(part: &str, message: impl Into<String>) -> Self {
        ContentError { part: part.to_string(), message: message.into(), source: None }
    }

    fn because(part: &str, message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ContentError { part: part.to_string(), message: message.into(), source: Some(Box::new(source)) }
    }
}

/// Where an image of a message comes from, before it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    Input(ImageInput),
    Remote(String),
}

/// An image found in the messages: its content part and its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatImage {
    pub part: String,
    pub source: ImageSource,
}

/// A chat image read, hashed and decoded: what the worker preprocesses and encodes (unless the
/// encoder cache has its hash), and its grid (how many pad tokens it takes).
#[derive(Clone, Debug)]
pub struct LoadedImage {
    pub part: String,
    pub hash: ImageHash,
    pub pixels: RgbImage,
    pub grid: GridThw,
}

/// The messages with each image part replaced by `{"type": "image"}` (for the chat template),
/// and the images in order.
pub fn split_chat_images(messages: &[Json]) -> Result<(Vec<Json>, Vec<ChatImage>), ContentError> {
    let mut images = Vec::new();
    let mut rendered = Vec::with_capacity(messages.len());
    for (m, message) in messages.iter().enumerate() {
        let Some(parts) = message.get("content").and_then(Json::as_array) else {
            rendered.push(message.clone());
            continue;
        };
        let mut kept = Vec::with_capacity(parts.len());
        for (c, part) in parts.iter().enumerate() {
            let at = format!("messages[{m}].content[{c}]");
            match image_of_part(part, &at)? {
                Some(image) => {
                    images.push(image);
                    kept.push(json!({"type": "image"}));
                }
                None => kept.push(part.clone()),
            }
        }
        let mut message = message.clone();
        message["content"] = Json::Array(kept);
        rendered.push(message);
    }
    Ok((rendered, images))
}

/// The image a content part holds, if it is an image part; videos are refused.
fn image_of_part(part: &Json, at: &str) -> Result<Option<ChatImage>, ContentError> {
    let Some(object) = part.as_object() else { return Ok(None) };
    let kind = object.get("type").and_then(Json::as_str);
    if matches!(kind, Some("video" | "video_url")) || object.contains_key("video") || object.contains_key("video_url") {
        return Err(ContentError::new(at, "videos are not supported (images only)"));
    }
    if kind == Some("image_url") || object.contains_key("image_url") {
        let field = format!("{at}.image_url");
        let url = match object.get("image_url") {
            Some(Json::String(url)) => url.as_str(),
            Some(Json::Object(inner)) => match inner.get("url") {
                Some(Json::String(url)) => url.as_str(),
                _ => {
                    return Err(ContentError::new(
                        &format!("{field}.url"),
                        "must be a string (a data URI, a path or a URL)",
                    ))
                }
            },
            _ => return Err(ContentError::new(&field, "must be {\"url\": ...} or a URL string")),
        };
        return Ok(Some(ChatImage { source: source_of_url(url), part: field }));
    }
    if kind != Some("image") && !object.contains_key("image") {
        return Ok(None);
    }
    for key in ["image", "url", "path", "base64"] {
        let Some(value) = object.get(key) else { continue };
        let field = format!("{at}.{key}");
        let source = match (key, value) {
            ("base64", Json::String(payload)) => {
                ImageSource::Input(ImageInput::DataUri(format!("data:;base64,{payload}")))
            }
            ("path", Json::String(path)) => ImageSource::Input(ImageInput::Path(path.into())),
            (_, Json::String(url)) => source_of_url(url),
            ("image", Json::Array(values)) => ImageSource::Input(ImageInput::Bytes(bytes_of(values, &field)?)),
            _ => {
                return Err(ContentError::new(
                    &field,
                    "must be a string (a data URI, a path or a URL) or, for `image`, an array of bytes",
                ))
            }
        };
        return Ok(Some(ChatImage { part: field, source }));
    }
    Err(ContentError::new(at, "an image part needs `image`, `url`, `path` or `base64`"))
}

fn bytes_of(values: &[Json], field: &str) -> Result<Vec<u8>, ContentError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|b| u8::try_from(b).ok())
                .ok_or_else(|| ContentError::new(field, format!("element {i} is not a byte (0 to 255)")))
        })
        .collect()
}

fn source_of_url(url: &str) -> ImageSource {
    let lower = url.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        ImageSource::Remote(url.to_string())
    } else if lower.starts_with("data:") {
        ImageSource::Input(ImageInput::DataUri(url.to_string()))
    } else {
        let path = url.strip_prefix("file://").unwrap_or(url);
        ImageSource::Input(ImageInput::Path(PathBuf::from(path)))
    }
}

impl ChatImage {
    /// Reads, hashes and decodes the image within `settings`, and finds its grid.
    pub fn load(&self, settings: &ImageSettings, processor: &ImageProcessor) -> Result<LoadedImage, ContentError> {
        let image_error = |e: ImageError| ContentError::because(&self.part, e.to_string(), e);
        let input = match &self.source {
            ImageSource::Remote(url) => ImageInput::Bytes(fetch(url, settings, &self.part)?),
            ImageSource::Input(ImageInput::Path(path)) => {
                check_local(path, &settings.local_files, &self.part)?;
                ImageInput::Path(path.clone())
            }
            ImageSource::Input(input) => input.clone(),
        };
        let encoded = input.read(&settings.limits).map_err(image_error)?;
        let hash = encoded.content_hash();
        let pixels = encoded.decode(&settings.limits).map_err(image_error)?;
        let grid = processor.grid(pixels.width(), pixels.height()).map_err(image_error)?;
        Ok(LoadedImage { part: self.part.clone(), hash, pixels, grid })
    }
}

fn check_local(path: &Path, policy: &LocalImageFiles, part: &str) -> Result<(), ContentError> {
    match policy {
        LocalImageFiles::Any => Ok(()),
        LocalImageFiles::Refused => Err(ContentError::new(
            part,
            "local image paths are not accepted here: send the image as a data URI (data:image/png;base64,...)",
        )),
        LocalImageFiles::Under(root) => {
            let outside = || ContentError::new(part, format!("image paths must be under {}", root.display()));
            let resolved = path
                .canonicalize()
                .map_err(|e| ContentError::because(part, format!("cannot read image file {}", path.display()), e))?;
            let root = root.canonicalize().map_err(|_| outside())?;
            if resolved.starts_with(&root) {
                Ok(())
            } else {
                Err(outside())
            }
        }
    }
}

/// A remote image's bytes, when the settings allow fetching: at most the input limit (checked
/// while reading, not only from Content-Length) within the timeout.
fn fetch(url: &str, settings: &ImageSettings, part: &str) -> Result<Vec<u8>, ContentError> {
    let RemoteImages::Fetch { timeout } = settings.remote else {
        return Err(ContentError::new(
            part,
            "remote image URLs are not fetched (the engine's remote_images setting is off): send the image as a data \
             URI, or start the engine with remote image fetching allowed",
        ));
    };
    let limit = settings.limits.max_input_bytes();
    let agent = ureq::AgentBuilder::new().timeout(timeout).redirects(5).build();
    let response = agent.get(url).call().map_err(|e| ContentError::because(part, format!("cannot fetch {url}"), e))?;
    let declared = response.header("Content-Length").and_then(|v| v.parse::<u64>().ok());
    let too_large = |bytes: u64| {
        ContentError::new(part, format!("{url}: {bytes} bytes is over the image input limit of {limit} bytes"))
    };
    if let Some(bytes) = declared.filter(|&b| b > limit) {
        return Err(too_large(bytes));
    }
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ContentError::because(part, format!("reading {url} failed"), e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_and_transformers_parts_are_found_in_order_and_their_places_kept() {
        let messages = vec![
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "and"},
                {"type": "image", "image": "/tmp/a.png"},
                {"type": "image", "image": [1, 2, 3]},
                {"type": "image", "url": "https://example.com/x.jpg"},
                {"type": "image_url", "image_url": "file:///tmp/b.png"},
            ]}),
        ];
        let (rendered, images) = split_chat_images(&messages).unwrap();
        assert_eq!(rendered[0], messages[0]);
        assert_eq!(
            rendered[1]["content"],
            json!([{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "image"},
                   {"type": "image"}, {"type": "image"}])
        );
        let parts: Vec<&str> = images.iter().map(|i| i.part.as_str()).collect();
        assert_eq!(
            parts,
            [
                "messages[1].content[0].image_url",
                "messages[1].content[2].image",
                "messages[1].content[3].image",
                "messages[1].content[4].url",
                "messages[1].content[5].image_url"
            ]
        );
        assert_eq!(images[0].source, ImageSource::Input(ImageInput::DataUri("data:image/png;base64,AAAA".into())));
        assert_eq!(images[1].source, ImageSource::Input(ImageInput::Path("/tmp/a.png".into())));
        assert_eq!(images[2].source, ImageSource::Input(ImageInput::Bytes(vec![1, 2, 3])));
        assert_eq!(images[3].source, ImageSource::Remote("https://example.com/x.jpg".into()));
        assert_eq!(images[4].source, ImageSource::Input(ImageInput::Path("/tmp/b.png".into())));
    }

    #[test]
    fn malformed_parts_and_videos_are_named() {
        let bad = |part: Json| {
            split_chat_images(&[json!({"role": "user", "content": [{"type": "text", "text": "x"}, part]})]).unwrap_err()
        };
        let e = bad(json!({"type": "image_url", "image_url": {"detail": "low"}}));
        assert_eq!(e.part, "messages[0].content[1].image_url.url");
        let e = bad(json!({"type": "image", "image": [1, 300]}));
        assert!(e.part == "messages[0].content[1].image" && e.message.contains("element 1"), "{e}");
        let e = bad(json!({"type": "video", "video": "clip.mp4"}));
        assert!(e.to_string().contains("videos are not supported"), "{e}");
        assert_eq!(bad(json!({"type": "image"})).part, "messages[0].content[1]");
    }

    /// Serves `body` once over HTTP on a local port; returns the URL.
    fn serve_once(body: Vec<u8>) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/picture.png", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0u8; 1024];
                let _ = std::io::Read::read(&mut stream, &mut request);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        url
    }

    #[test]
    fn remote_images_are_fetched_when_allowed_within_the_input_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.png");
        RgbImage::from_fn(40, 30, |x, y| [x as u8, y as u8, 9].into()).save(&file).unwrap();
        let png = std::fs::read(&file).unwrap();
        let processor = ImageProcessor::new(pio_image::ImageProcessorConfig::default());
        let fetch =
            ImageSettings { remote: RemoteImages::Fetch { timeout: Duration::from_secs(10) }, ..Default::default() };
        let remote = |url: String| ChatImage {
            part: "messages[0].content[0].image_url".into(),
            source: ImageSource::Remote(url),
        };
        let loaded = remote(serve_once(png.clone())).load(&fetch, &processor).unwrap();
        assert_eq!(loaded.hash, ImageHash::of_encoded(&png), "the fetched bytes are the file's");
        assert_eq!((loaded.pixels.width(), loaded.pixels.height()), (40, 30));
        let small = ImageSettings { limits: DecodeLimits::default().with_max_input_bytes(50), ..fetch.clone() };
        let e = remote(serve_once(png)).load(&small, &processor).unwrap_err();
        assert!(e.to_string().contains("over the image input limit of 50 bytes"), "{e}");
        // Nothing listens there: the error names the URL and keeps the transport's.
        let e = remote("http://127.0.0.1:9/none.png".into()).load(&fetch, &processor).unwrap_err();
        assert!(e.to_string().contains("cannot fetch http://127.0.0.1:9/none.png") && e.source.is_some(), "{e}");
    }

    #[test]
    fn remote_urls_and_local_files_follow_the_settings() {
        let processor = ImageProcessor::new(pio_image::ImageProcessorConfig::default());
        let remote = ChatImage {
            part: "messages[0].content[0].image_url".into(),
            source: ImageSource::Remote("https://example.com/a.png".into()),
        };
        let e = remote.load(&ImageSettings::default(), &processor).unwrap_err();
        assert!(e.to_string().contains("remote image URLs are not fetched"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.png");
        std::fs::write(&file, b"not a png").unwrap();
        let local = ChatImage {
            part: "messages[0].content[0].image".into(),
            source: ImageSource::Input(ImageInput::Path(file.clone())),
        };
        let refused = ImageSettings { local_files: LocalImageFiles::Refused, ..Default::default() };
        assert!(local
            .load(&refused, &processor)
            .unwrap_err()
            .to_string()
            .contains("local image paths are not accepted"));
        let elsewhere = ImageSettings {
            local_files: LocalImageFiles::Under(std::env::temp_dir().join("pio-nowhere")),
            ..Default::default()
        };
        assert!(local.load(&elsewhere, &processor).unwrap_err().to_string().contains("must be under"));
        // Allowed: it gets as far as decoding, which names the part and keeps the image error.
        let under = ImageSettings { local_files: LocalImageFiles::Under(dir.path().into()), ..Default::default() };
        let e = local.load(&under, &processor).unwrap_err();
        assert!(e.part.ends_with(".image") && e.source.as_ref().is_some_and(|s| s.is::<ImageError>()), "{e:?}");
    }
}
