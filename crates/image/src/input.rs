//! Where an image comes from: a file, bytes in memory, or a `data:` URI, read into encoded bytes under the
//! input-size limit.

use std::borrow::Cow;
use std::io::Read;
use std::path::PathBuf;

use base64::Engine;
use image::RgbImage;

use crate::error::ImageError;
use crate::hash::ImageHash;
use crate::limits::DecodeLimits;

/// An encoded image as a chat message or a CLI flag carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageInput {
    /// A file on disk.
    Path(PathBuf),
    /// The encoded file's bytes.
    Bytes(Vec<u8>),
    /// `data:[<media type>];base64,<payload>` (the media type is not trusted: the format is sniffed).
    DataUri(String),
}

impl ImageInput {
    /// How errors name this input: the path, or "image bytes" / "data URI".
    pub fn label(&self) -> String {
        match self {
            ImageInput::Path(path) => path.display().to_string(),
            ImageInput::Bytes(_) => "image bytes".to_string(),
            ImageInput::DataUri(_) => "data URI".to_string(),
        }
    }

    /// The encoded bytes (a file is read, a data URI base64-decoded), refused above `limits.max_input_bytes()`.
    pub fn read(&self, limits: &DecodeLimits) -> Result<EncodedImage<'_>, ImageError> {
        let bytes: Cow<'_, [u8]> = match self {
            ImageInput::Path(path) => Cow::Owned(read_file(path, limits)?),
            ImageInput::Bytes(bytes) => {
                check_size(self, bytes.len() as u64, limits)?;
                Cow::Borrowed(bytes)
            }
            ImageInput::DataUri(uri) => Cow::Owned(decode_data_uri(self, uri, limits)?),
        };
        if bytes.is_empty() {
            return Err(ImageError::Empty { input: self.label() });
        }
        Ok(EncodedImage { label: self.label(), bytes })
    }
}

/// An image's encoded bytes, read from an [`ImageInput`]: hash them for a cache key, decode them for pixels.
#[derive(Clone, Debug)]
pub struct EncodedImage<'a> {
    label: String,
    bytes: Cow<'a, [u8]>,
}

impl EncodedImage<'_> {
    /// Encoded bytes in memory, named `label` in errors.
    pub fn from_bytes(label: impl Into<String>, bytes: &[u8]) -> EncodedImage<'_> {
        EncodedImage { label: label.into(), bytes: Cow::Borrowed(bytes) }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// See [`ImageHash`]: the SHA-256 of these bytes.
    pub fn content_hash(&self) -> ImageHash {
        ImageHash::of_encoded(&self.bytes)
    }

    /// RGB pixels with the EXIF orientation applied; see [`crate::decode`].
    pub fn decode(&self, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
        crate::decode::decode_bytes(&self.bytes, &self.label, limits)
    }
}

fn check_size(input: &ImageInput, bytes: u64, limits: &DecodeLimits) -> Result<(), ImageError> {
    if bytes > limits.max_input_bytes() {
        return Err(ImageError::InputTooLarge { input: input.label(), bytes, limit: limits.max_input_bytes() });
    }
    Ok(())
}

fn read_file(path: &std::path::Path, limits: &DecodeLimits) -> Result<Vec<u8>, ImageError> {
    let read_error = |source| ImageError::ReadFile { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    // Read one byte past the limit rather than trusting the metadata size, which a pipe or a growing file
    // does not give.
    let mut bytes = Vec::new();
    file.take(limits.max_input_bytes().saturating_add(1)).read_to_end(&mut bytes).map_err(read_error)?;
    let input = ImageInput::Path(path.to_path_buf());
    check_size(&input, bytes.len() as u64, limits)?;
    Ok(bytes)
}

/// Parses `data:[<media type>][;params];base64,<payload>`. Only base64 payloads are accepted (images are
/// binary); ASCII whitespace inside the payload is skipped, as Python's `base64.decodebytes` does.
fn decode_data_uri(input: &ImageInput, uri: &str, limits: &DecodeLimits) -> Result<Vec<u8>, ImageError> {
    let malformed = |reason| ImageError::MalformedDataUri { input: input.label(), reason };
    let rest = strip_prefix_ignore_case(uri.trim_start(), "data:").ok_or(malformed("it does not start with data:"))?;
    let (header, payload) = rest.split_once(',').ok_or(malformed("there is no comma before the payload"))?;
    if !header.rsplit(';').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("base64")) {
        return Err(malformed("only ;base64 payloads are supported"));
    }
    // Base64 carries 3 bytes in 4 characters: refuse before decoding what would exceed the limit.
    check_size(input, (payload.len() as u64 / 4).saturating_mul(3), limits)?;
    let compact: Cow<'_, str> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(payload.chars().filter(|c| !c.is_ascii_whitespace()).collect())
    } else {
        Cow::Borrowed(payload)
    };
    BASE64.decode(compact.as_bytes()).map_err(|source| ImageError::InvalidBase64 { input: input.label(), source })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// The standard alphabet, with or without padding.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(uri: &str) -> Result<Vec<u8>, ImageError> {
        ImageInput::DataUri(uri.to_string()).read(&DecodeLimits::default()).map(|e| e.bytes().to_vec())
    }

    #[test]
    fn data_uri_forms() {
        assert_eq!(decode("data:image/png;base64,AAEC").unwrap(), vec![0, 1, 2]);
        assert_eq!(decode("DATA:image/png;BASE64,AAE=").unwrap(), vec![0, 1]);
        assert_eq!(decode("data:;base64,AAE").unwrap(), vec![0, 1]);
        assert_eq!(decode("data:image/jpeg;name=x.jpg;base64,AA\nEC\r\n").unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn data_uri_errors() {
        assert!(matches!(decode("image/png;base64,AAEC"), Err(ImageError::MalformedDataUri { .. })));
        assert!(matches!(decode("data:image/png;base64"), Err(ImageError::MalformedDataUri { .. })));
        assert!(matches!(decode("data:image/png,%89PNG"), Err(ImageError::MalformedDataUri { .. })));
        assert!(matches!(decode("data:image/png;base64,AA*C"), Err(ImageError::InvalidBase64 { .. })));
        assert!(matches!(decode("data:image/png;base64,"), Err(ImageError::Empty { .. })));
        let limits = DecodeLimits::default().with_max_input_bytes(2);
        let big = ImageInput::DataUri("data:image/png;base64,AAECAwQF".to_string());
        assert!(matches!(big.read(&limits).map(|_| ()), Err(ImageError::InputTooLarge { bytes: 6, limit: 2, .. })));
    }

    #[test]
    fn file_over_the_limit_is_refused_and_missing_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        std::fs::write(&path, [7u8; 10]).unwrap();
        let limits = DecodeLimits::default().with_max_input_bytes(9);
        let err = ImageInput::Path(path.clone()).read(&limits).unwrap_err();
        assert!(matches!(err, ImageError::InputTooLarge { bytes: 10, limit: 9, .. }), "{err}");
        let missing = ImageInput::Path(dir.path().join("missing.png"));
        let err = missing.read(&limits).unwrap_err();
        assert!(matches!(err, ImageError::ReadFile { .. }) && err.to_string().contains("missing.png"), "{err}");
    }
}
