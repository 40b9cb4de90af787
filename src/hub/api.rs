//! The few Hub HTTP endpoints Finch uses: model info, file metadata and contents (`resolve`),
//! model search and `whoami`. Turns HTTP statuses and the Hub's `X-Error-Code` header into
//! [`HubError`]s that say what to do. Tokens go only into the `Authorization` header, and never to
//! a redirected host (the CDN).

use std::time::Duration;

use serde::Deserialize;
use ureq::http::{HeaderMap, Response};
use ureq::Body;

use super::{HubError, HubOptions, Result, Token};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A stalled download fails after this long without a byte; the partial file is kept for resume.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// Model metadata from `/api/models/{id}/revision/{revision}`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ModelInfo {
    /// The commit the revision resolves to.
    pub sha: Option<String>,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
}

/// What a `HEAD` on a file's resolve URL says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMeta {
    pub commit: Option<String>,
    /// sha256 for LFS files (`X-Linked-Etag`), git blob sha1 for small files (`ETag`).
    pub etag: String,
    pub size_bytes: u64,
}

/// What a request was about, for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub id: &'a str,
    pub revision: &'a str,
    pub file: Option<&'a str>,
}

pub(crate) struct Client {
    /// Follows redirects (API calls, file contents via the CDN).
    agent: ureq::Agent,
    /// Follows none, so the `X-Linked-*` headers of the Hub's own redirect response can be read.
    head_agent: ureq::Agent,
    pub endpoint: String,
    token: Option<Token>,
}

impl Client {
    pub fn new(options: &HubOptions) -> Self {
        let build = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(Some(RESPONSE_TIMEOUT))
                .timeout_per_read(Some(READ_TIMEOUT))
                .user_agent(concat!("finch/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Client {
            agent: build(10),
            head_agent: build(0),
            endpoint: options.endpoint.trim_end_matches('/').to_string(),
            token: options.token.clone(),
        }
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>, token: Option<&Token>) -> ureq::RequestBuilder<B> {
        match token.or(self.token.as_ref()) {
            Some(token) => request.header("Authorization", format!("Bearer {}", token.secret())),
            None => request,
        }
    }

    fn transport_error(&self, err: ureq::Error) -> HubError {
        HubError::network(&self.endpoint, err.to_string(), None)
    }

    pub fn model_info(&self, ctx: Ctx<'_>) -> Result<ModelInfo> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            ctx.id,
            encode_component(ctx.revision)
        );
        self.get_json(&url, ctx, None)
    }

    pub fn file_url(&self, id: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{id}/resolve/{}/{}",
            self.endpoint,
            encode_component(revision),
            encode_path(file)
        )
    }

    /// `HEAD` on the file's resolve URL. Relative redirects (renamed repos) are followed;
    /// an absolute one (the CDN) is not, because the metadata is on the Hub's response.
    pub fn file_meta(&self, ctx: Ctx<'_>) -> Result<FileMeta> {
        let file = ctx.file.unwrap_or_default();
        let mut url = self.file_url(ctx.id, ctx.revision, file);
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let request = self
                .auth(self.head_agent.head(&url), None)
                .header("Accept-Encoding", "identity");
            let response = request.call().map_err(|e| self.transport_error(e))?;
            let status = response.status().as_u16();
            let headers = response.headers();
            if (300..400).contains(&status) {
                if let Some(next) = header(headers, "location").and_then(|l| same_origin_target(&url, l)) {
                    url = next;
                    continue;
                }
            } else if !(200..300).contains(&status) {
                return Err(self.status_error(status, headers, &url, ctx));
            }
            let etag = header(headers, "x-linked-etag")
                .or_else(|| header(headers, "etag"))
                .map(normalize_etag)
                .filter(|e| !e.is_empty())
                .ok_or_else(|| HubError::BadResponse {
                    url: url.clone(),
                    reason: "no ETag header, so the file cannot be verified or cached".to_string(),
                })?;
            if etag.contains(['/', '\\']) || etag.starts_with('.') {
                return Err(HubError::BadResponse {
                    url,
                    reason: format!("ETag `{etag}` is not usable as a file name"),
                });
            }
            let size_bytes = header(headers, "x-linked-size")
                .or_else(|| header(headers, "content-length"))
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| HubError::BadResponse {
                    url: url.clone(),
                    reason: "no X-Linked-Size or Content-Length header".to_string(),
                })?;
            let commit = header(headers, "x-repo-commit").map(str::to_string);
            if let Some(served) = commit.as_deref() {
                if super::is_commit_hash(ctx.revision) && served != ctx.revision {
                    // Snapshot folders are named by commit; mixing two commits in one would corrupt it.
                    return Err(HubError::BadResponse {
                        url,
                        reason: format!("asked for commit {}, the server answered for {served}", ctx.revision),
                    });
                }
            }
            return Ok(FileMeta {
                commit,
                etag,
                size_bytes,
            });
        }
        Err(HubError::BadResponse {
            url,
            reason: "too many redirects".to_string(),
        })
    }

    /// `GET` of a file's contents from `start_byte` on. Returns the response whatever its status;
    /// the caller handles 200 versus 206 versus 416.
    pub fn open_file(&self, ctx: Ctx<'_>, start_byte: u64) -> Result<Response<Body>> {
        let url = self.file_url(ctx.id, ctx.revision, ctx.file.unwrap_or_default());
        let mut request = self
            .auth(self.agent.get(&url), None)
            .header("Accept-Encoding", "identity");
        if start_byte > 0 {
            request = request.header("Range", format!("bytes={start_byte}-"));
        }
        let response = request.call().map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) || status == 416 {
            Ok(response)
        } else {
            Err(self.status_error(status, response.headers(), &url, ctx))
        }
    }

    /// `GET /api/models?…` with an already encoded query string.
    pub fn search(&self, query_string: &str) -> Result<Vec<serde_json::Value>> {
        let url = format!("{}/api/models?{query_string}", self.endpoint);
        let ctx = Ctx {
            id: "",
            revision: "",
            file: None,
        };
        self.get_json(&url, ctx, None)
    }

    pub fn whoami(&self, token: &Token) -> Result<String> {
        let url = format!("{}/api/whoami-v2", self.endpoint);
        let request = self.auth(self.agent.get(&url), Some(token));
        let mut response = request.call().map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(HubError::Http {
                url,
                status,
                message: ": the Hub refused this token (mistyped, revoked or expired?)".to_string(),
            });
        }
        if !(200..300).contains(&status) {
            return Err(self.status_error(
                status,
                response.headers(),
                &url,
                Ctx {
                    id: "",
                    revision: "",
                    file: None,
                },
            ));
        }
        let value: serde_json::Value = read_json(&mut response, &url)?;
        value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string)
            .ok_or_else(|| HubError::BadResponse {
                url,
                reason: "no `name` in the answer".to_string(),
            })
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str, ctx: Ctx<'_>, token: Option<&Token>) -> Result<T> {
        let request = self.auth(self.agent.get(url), token);
        let mut response = request.call().map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.status_error(status, response.headers(), url, ctx));
        }
        read_json(&mut response, url)
    }

    /// Maps an HTTP error to what the user needs to know. The Hub answers 401 for unknown repos
    /// when no token is sent, so `X-Error-Code` takes precedence over the status.
    fn status_error(&self, status: u16, headers: &HeaderMap, url: &str, ctx: Ctx<'_>) -> HubError {
        let code = header(headers, "x-error-code").unwrap_or_default();
        let id = ctx.id.to_string();
        let about_a_repo = !id.is_empty();
        if about_a_repo && (code == "RepoNotFound" || (code.is_empty() && status == 404 && ctx.file.is_none())) {
            return HubError::NotFound {
                id,
                endpoint: self.endpoint.clone(),
            };
        }
        if about_a_repo && code == "RevisionNotFound" {
            return HubError::RevisionNotFound {
                id,
                revision: ctx.revision.to_string(),
                endpoint: self.endpoint.clone(),
            };
        }
        if about_a_repo && (code == "EntryNotFound" || status == 404) {
            return HubError::FileNotFound {
                id,
                revision: ctx.revision.to_string(),
                file: ctx.file.unwrap_or_default().to_string(),
            };
        }
        if about_a_repo && (code == "GatedRepo" || status == 401 || status == 403) {
            return HubError::Gated {
                id,
                status,
                endpoint: self.endpoint.clone(),
                token_note: if self.token.is_some() {
                    " and the token Finch sent has no access to it".to_string()
                } else {
                    String::new()
                },
            };
        }
        HubError::Http {
            url: url.to_string(),
            status,
            message: header(headers, "x-error-message")
                .map(|m| format!(": {m}"))
                .unwrap_or_default(),
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(response: &mut Response<Body>, url: &str) -> Result<T> {
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_JSON_BYTES)
        .read_to_string()
        .map_err(|e| HubError::BadResponse {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    serde_json::from_str(&text).map_err(|e| HubError::BadResponse {
        url: url.to_string(),
        reason: format!("invalid JSON: {e}"),
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `http://host:port/some/prefix` → `http://host:port`, what a host-relative `Location` joins to.
fn origin(endpoint: &str) -> &str {
    let after_scheme = endpoint.find("://").map(|i| i + 3).unwrap_or(0);
    match endpoint[after_scheme..].find('/') {
        Some(slash) => &endpoint[..after_scheme + slash],
        None => endpoint,
    }
}

/// Where a redirect from `url` to `location` leads, if it stays on the same origin (a renamed
/// repo); `None` for another origin (the CDN), whose redirect response carries the metadata.
fn same_origin_target(url: &str, location: &str) -> Option<String> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!("{}{location}", origin(url)));
    }
    (location.contains("://") && origin(location) == origin(url)).then(|| location.to_string())
}

/// `W/"abc"` → `abc`.
fn normalize_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a `/` in a revision becomes `%2F`).
pub(crate) fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Encodes each segment of a file path, keeping the `/` between them.
fn encode_path(path: &str) -> String {
    path.split('/').map(encode_component).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_paths_and_escapes_revisions() {
        assert_eq!(encode_component("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_component("smol lm+"), "smol%20lm%2B");
        assert_eq!(encode_path("sub dir/a.gguf"), "sub%20dir/a.gguf");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(origin("https://hf-mirror.example/hub/"), "https://hf-mirror.example");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        let from = "https://hub.example/org/old/resolve/main/config.json";
        assert_eq!(
            same_origin_target(from, "/org/new/resolve/main/config.json").as_deref(),
            Some("https://hub.example/org/new/resolve/main/config.json")
        );
        assert_eq!(
            same_origin_target(from, "https://hub.example/org/new/x").as_deref(),
            Some("https://hub.example/org/new/x")
        );
        assert_eq!(same_origin_target(from, "https://cdn.example/abc"), None);
        assert_eq!(same_origin_target(from, "//cdn.example/abc"), None);
    }
}
