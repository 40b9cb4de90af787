//! A fake Hugging Face Hub served on 127.0.0.1 from a named thread, implementing the few routes of
//! the real API that Finch uses, with the real headers:
//!
//! - `GET /api/models?search=…&limit=…&sort=…`          search
//! - `GET /api/models/{id}[/revision/{rev}]`            model info (`sha`, `siblings`)
//! - `GET /api/models/{id}/tree/{rev}`                  file listing (Python's `snapshot_download` uses it)
//! - `GET /api/whoami-v2`                               token check
//! - `HEAD|GET /{id}/resolve/{rev}/{file}`              small files: 200 with `ETag` = git blob sha1;
//!   LFS files (`*.safetensors`, `*.gguf`, `*.bin`): 302 to `/cdn/{sha256}` on a second port (another
//!   origin, like the real CDN) with `X-Linked-Etag`, `X-Linked-Size`; both with `X-Repo-Commit`
//! - `GET /cdn/{sha256}`                                LFS contents, with `Range` support
//!
//! Gated repos answer 401 without a token and 403 with a wrong one (`X-Error-Code: GatedRepo`);
//! unknown repos 401 without a token and 404 with one (`X-Error-Code: RepoNotFound`), as the real Hub does. Every request is recorded so tests can count them and
//! inspect headers. Faults can be injected: drop the connection after N bytes of a file (once),
//! or serve a file with one byte flipped.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use sha1::Digest as _;

/// One repository served by the fake Hub.
#[derive(Debug, Clone)]
pub struct FakeRepo {
    pub id: String,
    pub commit: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// `Some(token)`: gated, only this bearer token gets in.
    pub gated_token: Option<String>,
    /// Extra fields for search results (`downloads`, `likes`, `tags`, `config`, `safetensors`, …).
    pub search_fields: Value,
}

impl FakeRepo {
    pub fn new(id: &str, commit: &str) -> Self {
        FakeRepo {
            id: id.to_string(),
            commit: commit.to_string(),
            files: BTreeMap::new(),
            gated_token: None,
            search_fields: json!({}),
        }
    }

    pub fn file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.insert(name.to_string(), bytes.into());
        self
    }

    /// Adds every file of a local folder (non-recursive).
    pub fn files_from_dir(mut self, dir: &std::path::Path) -> Self {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_file() {
                let name = entry.file_name().to_string_lossy().to_string();
                self.files.insert(name, std::fs::read(entry.path()).unwrap());
            }
        }
        self
    }

    pub fn gated(mut self, token: &str) -> Self {
        self.gated_token = Some(token.to_string());
        self
    }

    pub fn search_fields(mut self, fields: Value) -> Self {
        self.search_fields = fields;
        self
    }
}

pub fn is_lfs(name: &str) -> bool {
    [".safetensors", ".gguf", ".bin"].iter().any(|ext| name.ends_with(ext))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// `git hash-object` of the contents: what the Hub sends as the `ETag` of a small file.
pub fn git_sha1_hex(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The etag the Hub reports for a file, which names its blob in the cache.
pub fn etag_of(name: &str, bytes: &[u8]) -> String {
    if is_lfs(name) {
        sha256_hex(bytes)
    } else {
        git_sha1_hex(bytes)
    }
}

/// A request as the fake Hub received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path with query string, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    requests: Vec<Recorded>,
    /// file name → bytes to send before dropping the connection (once).
    drop_after: HashMap<String, u64>,
    corrupt: HashSet<String>,
}

pub struct FakeHub {
    /// The Hub's own origin.
    addr: SocketAddr,
    /// A second origin standing in for the CDN that LFS files redirect to, so clients see a
    /// cross-origin redirect as they do on the real Hub.
    cdn_addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves one listener sequentially (one request per connection) until `stop` is set.
fn serve(
    name: &str,
    listener: TcpListener,
    cdn_addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    handle(stream, cdn_addr, &state);
                }
            }
        })
        .unwrap()
}

impl FakeHub {
    pub fn start(repos: Vec<FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cdn_addr = cdn_listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            serve("fake-hub", listener, cdn_addr, state.clone(), stop.clone()),
            serve("fake-hub-cdn", cdn_listener, cdn_addr, state.clone(), stop.clone()),
        ];
        FakeHub {
            addr,
            cdn_addr,
            state,
            stop,
            threads,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// The next transfer of `file` sends only `bytes` bytes, then the connection is dropped.
    pub fn drop_connection_after(&self, file: &str, bytes: u64) {
        lock(&self.state).drop_after.insert(file.to_string(), bytes);
    }

    /// Serve `file` with its first byte flipped (headers still announce the true hash).
    pub fn set_corrupt(&self, file: &str, corrupt: bool) {
        let mut state = lock(&self.state);
        if corrupt {
            state.corrupt.insert(file.to_string());
        } else {
            state.corrupt.remove(file);
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accepts.
        let _ = TcpStream::connect(self.addr);
        let _ = TcpStream::connect(self.cdn_addr);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut_after: Option<u64>,
}

impl Reply {
    fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_after: None,
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn json(value: Value) -> Self {
        let mut r = Reply::new(200).header("Content-Type", "application/json");
        r.body = value.to_string().into_bytes();
        r
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .header("Content-Type", "application/json");
        r.body = json!({ "error": message }).to_string().into_bytes();
        r
    }
}

fn handle(stream: TcpStream, cdn_addr: SocketAddr, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let request = Recorded {
        method: method.clone(),
        target: target.clone(),
        headers,
    };
    let reply = {
        let mut state = lock(state);
        state.requests.push(request.clone());
        route(&request, cdn_addr, &mut state)
    };
    write_reply(stream, &method, reply);
}

fn write_reply(mut stream: TcpStream, method: &str, reply: Reply) {
    let reason = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    let has_length = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).is_err() || method == "HEAD" {
        return;
    }
    let body = match reply.cut_after {
        Some(n) => &reply.body[..(n as usize).min(reply.body.len())],
        None => &reply.body[..],
    };
    let _ = stream.write_all(body);
    let _ = stream.flush();
    if reply.cut_after.is_some() {
        let _ = stream.shutdown(Shutdown::Both);
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(digits, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn authorized(repo: &FakeRepo, request: &Recorded) -> bool {
    match &repo.gated_token {
        None => true,
        Some(token) => request.header("authorization") == Some(&format!("Bearer {token}")),
    }
}

/// Like the real Hub: 401 without a token, 403 when a token lacks access.
fn gated_reply(request: &Recorded) -> Reply {
    let status = if request.header("authorization").is_some() {
        403
    } else {
        401
    };
    Reply::error(status, "GatedRepo", "Access to this model is restricted")
}

/// Like the real Hub, which does not reveal to anonymous callers whether a private repo exists:
/// 401 without a token, 404 with one; `X-Error-Code: RepoNotFound` either way.
fn unknown_repo_reply(request: &Recorded) -> Reply {
    let status = if request.header("authorization").is_some() {
        404
    } else {
        401
    };
    Reply::error(status, "RepoNotFound", "Repository not found")
}

fn route(request: &Recorded, cdn_addr: SocketAddr, state: &mut State) -> Reply {
    let (path, query) = request.target.split_once('?').unwrap_or((&request.target, ""));
    if path == "/api/models" {
        return search(&query_params(query), state);
    }
    if path == "/api/whoami-v2" {
        let known = state
            .repos
            .iter()
            .filter_map(|r| r.gated_token.as_ref())
            .any(|t| request.header("authorization") == Some(&format!("Bearer {t}")));
        return if known {
            Reply::json(json!({"name": "tester", "type": "user"}))
        } else {
            Reply::error(401, "", "Invalid credentials in Authorization header")
        };
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return cdn(sha, request, state);
    }
    if let Some((id, revision)) = path
        .strip_prefix("/api/models/")
        .and_then(|rest| rest.split_once("/tree/"))
    {
        return tree(id, &percent_decode(revision), request, state);
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (id, revision) = match rest.split_once("/revision/") {
            Some((id, rev)) => (id.to_string(), percent_decode(rev)),
            None => (rest.to_string(), "main".to_string()),
        };
        let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
            return unknown_repo_reply(request);
        };
        if !authorized(repo, request) {
            return gated_reply(request);
        }
        if revision != "main" && revision != repo.commit {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<Value> = repo.files.keys().map(|f| json!({ "rfilename": f })).collect();
        return Reply::json(json!({
            "id": repo.id, "modelId": repo.id, "sha": repo.commit, "siblings": siblings,
            "gated": repo.gated_token.is_some(), "private": false,
        }));
    }
    if let Some((id, rest)) = path.trim_start_matches('/').split_once("/resolve/") {
        let id = id.to_string();
        let Some((revision, file)) = rest.split_once('/') else {
            return Reply::error(404, "EntryNotFound", "no file");
        };
        let (revision, file) = (percent_decode(revision), percent_decode(file));
        let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
            return unknown_repo_reply(request);
        };
        if !authorized(repo, request) {
            return gated_reply(request);
        }
        if revision != "main" && revision != repo.commit {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        }
        let Some(bytes) = repo.files.get(&file) else {
            return Reply::error(404, "EntryNotFound", "Entry not found");
        };
        let commit = repo.commit.clone();
        if is_lfs(&file) {
            let sha = sha256_hex(bytes);
            return Reply::new(302)
                .header("Location", format!("http://{cdn_addr}/cdn/{sha}"))
                .header("ETag", format!("\"{sha}\""))
                .header("X-Linked-Etag", format!("\"{sha}\""))
                .header("X-Linked-Size", bytes.len().to_string())
                .header("X-Repo-Commit", commit);
        }
        let etag = git_sha1_hex(bytes);
        let bytes = bytes.clone();
        return serve_bytes(&file, bytes, request, state)
            .header("ETag", format!("\"{etag}\""))
            .header("X-Repo-Commit", commit);
    }
    Reply::error(404, "", "no such route")
}

/// `GET /api/models/{id}/tree/{rev}?recursive=true`, which Python's `snapshot_download` lists files with.
fn tree(id: &str, revision: &str, request: &Recorded, state: &State) -> Reply {
    let Some(repo) = state.repos.iter().find(|r| r.id == id) else {
        return unknown_repo_reply(request);
    };
    if !authorized(repo, request) {
        return gated_reply(request);
    }
    if revision != "main" && revision != repo.commit {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    }
    let mut entries = Vec::new();
    let mut folders = std::collections::BTreeSet::new();
    for (name, bytes) in &repo.files {
        let mut parent = name.as_str();
        while let Some((folder, _)) = parent.rsplit_once('/') {
            folders.insert(folder.to_string());
            parent = folder;
        }
        let mut entry = json!({ "type": "file", "path": name, "size": bytes.len(), "oid": git_sha1_hex(bytes) });
        if is_lfs(name) {
            entry["lfs"] = json!({ "oid": sha256_hex(bytes), "size": bytes.len(), "pointerSize": 134 });
        }
        entries.push(entry);
    }
    for folder in folders {
        entries.push(json!({ "type": "directory", "path": folder, "size": 0, "oid": "0".repeat(40) }));
    }
    Reply::json(Value::Array(entries))
}

fn cdn(sha: &str, request: &Recorded, state: &mut State) -> Reply {
    let found = state.repos.iter().find_map(|repo| {
        repo.files
            .iter()
            .find(|(name, bytes)| is_lfs(name) && sha256_hex(bytes) == sha)
            .map(|(name, bytes)| (name.clone(), bytes.clone()))
    });
    match found {
        Some((name, bytes)) => serve_bytes(&name, bytes, request, state),
        None => Reply::error(404, "", "no such blob"),
    }
}

/// 200 or 206 with the (maybe corrupted) bytes, honouring `Range: bytes=N-`.
fn serve_bytes(name: &str, mut bytes: Vec<u8>, request: &Recorded, state: &mut State) -> Reply {
    if state.corrupt.contains(name) && !bytes.is_empty() {
        bytes[0] ^= 0xff;
    }
    let total = bytes.len();
    let start = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let mut reply = match start {
        Some(start) if start >= total => {
            return Reply::new(416).header("Content-Range", format!("bytes */{total}"));
        }
        Some(start) => {
            let mut r = Reply::new(206).header("Content-Range", format!("bytes {start}-{}/{total}", total - 1));
            r.body = bytes[start..].to_vec();
            r
        }
        None => {
            let mut r = Reply::new(200);
            r.body = bytes;
            r
        }
    };
    reply = reply.header("Accept-Ranges", "bytes");
    if request.method == "GET" {
        reply.cut_after = state.drop_after.remove(name);
    }
    reply
}

fn search(params: &[(String, String)], state: &State) -> Reply {
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let text = get("search").unwrap_or("").to_ascii_lowercase();
    let limit: usize = get("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
    let sort = get("sort").unwrap_or("downloads").to_string();
    let mut found: Vec<Value> = state
        .repos
        .iter()
        .filter(|r| r.id.to_ascii_lowercase().contains(&text))
        .map(|r| {
            let mut v = r.search_fields.clone();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("id".into(), json!(r.id));
                obj.insert("gated".into(), json!(r.gated_token.is_some()));
            }
            v
        })
        .collect();
    found.sort_by_key(|v| std::cmp::Reverse(v.get(&sort).and_then(Value::as_u64).unwrap_or(0)));
    found.truncate(limit);
    Reply::json(Value::Array(found))
}
