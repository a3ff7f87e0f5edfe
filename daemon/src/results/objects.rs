//! Output objects in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, moto) through the
//! `object_store` crate: put before the commit that records an output, presigned GET URLs for
//! the API, reads for `?redirect=false`, and deletes for retention and user deletion.
//!
//! Keys are `<prefix>/<job id>/<index>-<safe name>` (`<prefix>/<job id>/<tag>-<index>-<safe
//! name>` for a result that may race another attempt's, so a loser never replaces the winner's
//! object). Credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or an owner-only
//! credentials file; they are never logged (`Debug` shows only the bucket and endpoint).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStoreExt, PutPayload};

use super::config::{StorageConfig, StorageKind};

/// Access keys for the bucket.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// The bucket that holds this cluster's outputs.
#[derive(Clone)]
pub struct ObjectStorage {
    s3: Arc<AmazonS3>,
    bucket: String,
    endpoint: Option<String>,
    prefix: String,
    presign_ttl: Duration,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ObjectStorage {
    /// The bucket `[storage]` names (`None` for `kind = "disk"`), with `credentials`.
    pub fn from_config(
        config: &StorageConfig,
        credentials: Credentials,
    ) -> Result<Option<ObjectStorage>, String> {
        if config.kind != StorageKind::S3 {
            return Ok(None);
        }
        let bucket = config
            .bucket
            .clone()
            .ok_or_else(|| "storage.bucket: kind = \"s3\" needs a bucket".to_string())?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(config.region())
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            // Path-style URLs (`<endpoint>/<bucket>/<key>`): what R2, MinIO and moto take.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let s3 = builder
            .build()
            .map_err(|e| format!("storage: cannot configure the bucket {bucket:?}: {e}"))?;
        Ok(Some(ObjectStorage {
            s3: Arc::new(s3),
            bucket,
            endpoint: config.endpoint.clone(),
            prefix: config.prefix.trim_matches('/').to_string(),
            presign_ttl: config.presign_ttl,
        }))
    }

    /// The key of an output: `<prefix>/<job id>/<name>` (no leading slash without a prefix).
    pub fn key(&self, job_id: &str, name: &str) -> String {
        if self.prefix.is_empty() {
            format!("{job_id}/{name}")
        } else {
            format!("{}/{job_id}/{name}", self.prefix)
        }
    }

    fn path(key: &str) -> Result<ObjectPath, String> {
        ObjectPath::parse(key).map_err(|e| format!("object key {key:?} is not valid: {e}"))
    }

    /// Stores `bytes` under `key` (replacing an object already there).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        let path = Self::path(key)?;
        self.s3
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| format!("uploading {key} to bucket {}: {e}", self.bucket))
    }

    /// The object under `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        let path = Self::path(key)?;
        let result = self
            .s3
            .get(&path)
            .await
            .map_err(|e| format!("reading {key} from bucket {}: {e}", self.bucket))?;
        result
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| format!("reading {key} from bucket {}: {e}", self.bucket))
    }

    /// Deletes the object under `key`; one that is not there is fine.
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        let path = Self::path(key)?;
        match self.s3.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(format!("deleting {key} from bucket {}: {e}", self.bucket)),
        }
    }

    /// A GET URL for `key` that works without credentials for `presign_ttl`.
    pub async fn presigned_get(&self, key: &str) -> Result<String, String> {
        let path = Self::path(key)?;
        self.s3
            .signed_url(object_store::signer::Method::GET, &path, self.presign_ttl)
            .await
            .map(|url| url.to_string())
            .map_err(|e| format!("presigning {key}: {e}"))
    }
}
