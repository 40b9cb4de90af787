//! The Hub client against a fake Hub on 127.0.0.1 (tests/support/fake_hub.rs) serving a generated
//! tiny model: search, downloads into the Hugging Face cache layout, progress, resume after a
//! dropped connection, corruption, gated and unknown models, offline use, cache reuse with zero
//! requests, a cache written the way Python's `huggingface_hub` writes it, and the CLI end to end.
//! Every test uses its own temp cache and an explicit endpoint; none touches ~/.cache or the
//! process environment.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on a broken fixture

#[path = "support/fake_hub.rs"]
mod fake_hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use fake_hub::{etag_of, sha256_hex, FakeHub, FakeRepo};
use finch::hub::{self, DownloadProgress, DownloadRequest, Hub, HubError, HubOptions, SearchQuery, SearchSort, Token};
use finch::model::tiny::TinySpec;
use finch::model::{Family, ModelConfig};
use serde_json::json;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const TINY: &str = "test-org/tiny-llama";
const GATED_TOKEN: &str = "hf_GATEDsecret1234567890";

/// The files `TinySpec` writes, read into memory.
fn tiny_files() -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    TinySpec::new(Family::Llama).write(dir.path()).unwrap();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        files.insert(
            entry.file_name().to_string_lossy().to_string(),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    files
}

/// The tiny model plus files Finch must not fetch.
fn tiny_repo(id: &str, commit: &str) -> FakeRepo {
    let mut repo = FakeRepo::new(id, commit)
        .file("README.md", "# tiny\n")
        .file("pytorch_model.bin", vec![7u8; 64])
        .file("onnx/model.onnx", vec![1u8; 32]);
    for (name, bytes) in tiny_files() {
        repo = repo.file(&name, bytes);
    }
    repo
}

fn options(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions::new(cache).with_endpoint(hub.endpoint())
}

fn fetch(options: &HubOptions, request: &DownloadRequest) -> Result<PathBuf, HubError> {
    hub::download(options, request, &mut |_| {}, &AtomicBool::new(false))
}

fn fetch_id(options: &HubOptions, id: &str) -> Result<PathBuf, HubError> {
    fetch(options, &DownloadRequest::new(id))
}

fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    cache.join(format!("models--{}", id.replace('/', "--")))
}

/// A port nothing listens on.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

const NEEDED: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

#[test]
fn search_offers_supported_small_models_and_all_shows_the_rest() {
    let st = |total: u64| json!({ "total": total, "parameters": { "BF16": total } });
    let hub = FakeHub::start(vec![
        FakeRepo::new("test-org/tiny-llama-chat", COMMIT).search_fields(json!({
            "downloads": 500, "likes": 40,
            "tags": ["transformers", "safetensors", "llama", "text-generation", "license:apache-2.0"],
            "config": { "model_type": "llama" }, "safetensors": st(1_234_567), "usedStorage": 5_000_000,
        })),
        FakeRepo::new("test-org/tiny-qwen-gguf", COMMIT).search_fields(json!({
            "downloads": 300, "likes": 90, "tags": ["gguf", "license:mit"],
            "gguf": { "total": 494_032_768u64, "architecture": "qwen2" },
        })),
        FakeRepo::new("test-org/tiny-gpt2", COMMIT).search_fields(json!({
            "downloads": 1000, "likes": 1, "tags": ["safetensors", "gpt2"],
            "config": { "model_type": "gpt2" }, "safetensors": st(124_000_000),
        })),
        FakeRepo::new("test-org/tiny-pickle", COMMIT).search_fields(json!({
            "downloads": 800, "likes": 2, "tags": ["pytorch", "llama"], "config": { "model_type": "llama" },
        })),
        FakeRepo::new("test-org/tiny-but-huge", COMMIT).search_fields(json!({
            "downloads": 900, "likes": 3, "tags": ["safetensors", "llama"],
            "config": { "model_type": "llama" }, "safetensors": st(70_000_000_000),
        })),
        FakeRepo::new("other/unrelated", COMMIT).search_fields(json!({ "downloads": 10_000 })),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&hub, dir.path());

    let found = hub::search(&opts, &SearchQuery::new("TINY")).unwrap();
    let ids: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["test-org/tiny-llama-chat", "test-org/tiny-qwen-gguf"]);
    let llama = &found[0];
    assert_eq!(llama.license.as_deref(), Some("apache-2.0"));
    assert_eq!(
        (llama.downloads, llama.likes, llama.parameters),
        (500, 40, Some(1_234_567))
    );
    assert_eq!(llama.storage_bytes, Some(5_000_000));
    assert_eq!(found[1].model_type.as_deref(), Some("qwen2"));

    let request = hub.requests().pop().unwrap();
    assert!(request.target.starts_with("/api/models?"), "{}", request.target);
    for part in [
        "search=TINY",
        "filter=text-generation",
        "sort=downloads",
        "direction=-1",
    ] {
        assert!(request.target.contains(part), "{part} missing from {}", request.target);
    }

    let mut query = SearchQuery::new("tiny");
    query.include_unsupported = true;
    let all = hub::search(&opts, &query).unwrap();
    let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "test-org/tiny-gpt2",
            "test-org/tiny-but-huge",
            "test-org/tiny-pickle",
            "test-org/tiny-llama-chat",
            "test-org/tiny-qwen-gguf"
        ]
    );
    let reason = |id: &str| {
        all.iter()
            .find(|m| m.id == id)
            .unwrap()
            .unsupported_reason
            .clone()
            .unwrap()
    };
    assert!(reason("test-org/tiny-gpt2").contains("gpt2"));
    assert!(reason("test-org/tiny-but-huge").contains("70.0B"));
    assert!(reason("test-org/tiny-pickle").contains("safetensors"));

    query.limit = 2;
    query.sort = SearchSort::Likes;
    let top = hub::search(&opts, &query).unwrap();
    assert_eq!(top.len(), 2);
    assert!(hub.requests().pop().unwrap().target.contains("sort=likes"));
}

#[test]
fn fresh_download_writes_the_huggingface_layout_and_the_model_loads() {
    let source = tiny_files();
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let snapshot = fetch_id(&options(&hub, cache.path()), TINY).unwrap();

    let repo = repo_dir(cache.path(), TINY);
    assert_eq!(snapshot, repo.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo.join("refs").join("main")).unwrap(), COMMIT);
    for name in NEEDED {
        let link = snapshot.join(name);
        assert!(
            std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
            "{name}"
        );
        let etag = etag_of(name, &source[name]);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(format!("../../blobs/{etag}"))
        );
        assert_eq!(
            std::fs::read(&link).unwrap(),
            source[name],
            "{name} differs from the served file"
        );
    }
    // Only what Finch needs: no README, pickle or ONNX file, and nothing was even requested for them.
    let mut present: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    present.sort();
    assert_eq!(present, NEEDED);
    for r in hub.requests() {
        assert!(
            !r.target.contains("README") && !r.target.contains(".bin") && !r.target.contains("onnx"),
            "{}",
            r.target
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".incomplete")
        })
        .collect();
    assert!(leftovers.is_empty());

    // The downloaded folder is a model Finch can load.
    let config = ModelConfig::from_file(&snapshot.join("config.json")).unwrap();
    assert_eq!(config.family, Family::Llama);
    let tensors =
        candle_core::safetensors::load(snapshot.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let expected = TinySpec::new(Family::Llama).weights().unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    let mut expected_names: Vec<&String> = expected.keys().collect();
    names.sort();
    expected_names.sort();
    assert_eq!(names, expected_names);
}

#[test]
fn progress_events_count_every_byte_and_reach_the_total() {
    let source = tiny_files();
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let mut events = Vec::new();
    hub::download(
        &options(&hub, cache.path()),
        &DownloadRequest::new(TINY),
        &mut |e| events.push(e),
        &AtomicBool::new(false),
    )
    .unwrap();

    let expected_total: u64 = NEEDED.iter().map(|n| source[*n].len() as u64).sum();
    let DownloadProgress::Planned {
        total_bytes,
        done_bytes,
        files,
        commit,
        ..
    } = &events[0]
    else {
        panic!("first event is not Planned: {:?}", events[0]);
    };
    assert_eq!(
        (*total_bytes, *done_bytes, commit.as_str()),
        (expected_total, 0, COMMIT)
    );
    assert_eq!(files.len(), NEEDED.len());
    assert!(
        matches!(events.last(), Some(DownloadProgress::Finished { total_bytes, .. }) if *total_bytes == expected_total)
    );

    let mut last_done = 0;
    let mut last_bytes = None;
    for e in &events {
        if let DownloadProgress::Bytes {
            done_bytes,
            total_bytes,
            ..
        } = e
        {
            assert!(*done_bytes >= last_done, "progress went backwards");
            assert_eq!(*total_bytes, expected_total);
            last_done = *done_bytes;
            last_bytes = Some(e.clone());
        }
    }
    assert_eq!(last_done, expected_total, "the last byte event must be at 100%");
    assert!(matches!(last_bytes, Some(DownloadProgress::Bytes { file, .. }) if NEEDED.contains(&file.as_str())));
    for name in NEEDED {
        for wanted in ["FileStarted", "Verifying", "FileDone"] {
            let seen = events.iter().any(|e| {
                matches!((wanted, e),
                    ("FileStarted", DownloadProgress::FileStarted { file, .. })
                    | ("Verifying", DownloadProgress::Verifying { file })
                    | ("FileDone", DownloadProgress::FileDone { file }) if file == name)
            });
            assert!(seen, "no {wanted} event for {name}");
        }
    }
}

#[test]
fn interrupted_transfer_resumes_with_a_range_request_and_verifies() {
    let source = tiny_files();
    let weights = &source["model.safetensors"];
    let half = weights.len() as u64 / 2;
    assert!(half > 1000, "the tiny model is too small for this test");
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    hub.drop_connection_after("model.safetensors", half);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let err = fetch_id(&opts, TINY).unwrap_err();
    assert!(
        matches!(&err, HubError::Interrupted { file, done_bytes, .. } if file == "model.safetensors" && *done_bytes == half),
        "{err:?}"
    );
    assert!(err.to_string().contains("resume"), "{err}");
    let sha = sha256_hex(weights);
    let blobs = repo_dir(cache.path(), TINY).join("blobs");
    assert_eq!(
        std::fs::metadata(blobs.join(format!("{sha}.incomplete")))
            .unwrap()
            .len(),
        half
    );
    assert!(!blobs.join(&sha).exists());
    let snapshot = repo_dir(cache.path(), TINY).join("snapshots").join(COMMIT);
    assert!(!snapshot.join("model.safetensors").exists());
    assert!(Hub::new(opts.clone()).cached_snapshot(TINY, "main").unwrap().is_none());

    hub.clear_requests();
    let mut resumed_from = None;
    let path = hub::download(
        &opts,
        &DownloadRequest::new(TINY),
        &mut |e| {
            if let DownloadProgress::FileStarted {
                file,
                resume_from_bytes,
                ..
            } = e
            {
                if file == "model.safetensors" {
                    resumed_from = Some(resume_from_bytes);
                }
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(resumed_from, Some(half));
    let transfers: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.target.starts_with("/cdn/"))
        .collect();
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(transfers[0].header("range"), Some(format!("bytes={half}-").as_str()));
    assert_eq!(&std::fs::read(path.join("model.safetensors")).unwrap(), weights);
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());
    // Files completed by the first attempt were not fetched again.
    assert!(!hub.requests().iter().any(|r| r.target.contains("config.json")));
}

#[test]
fn corrupted_files_are_detected_and_kept_out_of_the_cache() {
    let source = tiny_files();
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let blobs = repo_dir(cache.path(), TINY).join("blobs");
    let snapshot = repo_dir(cache.path(), TINY).join("snapshots").join(COMMIT);

    // A large (LFS) file is checked against its sha256 …
    hub.set_corrupt("model.safetensors", true);
    let err = fetch_id(&opts, TINY).unwrap_err();
    let sha = sha256_hex(&source["model.safetensors"]);
    match &err {
        HubError::Checksum {
            file,
            algorithm,
            expected,
            found,
        } => {
            assert_eq!(
                (file.as_str(), algorithm.as_str(), expected.as_str()),
                ("model.safetensors", "sha256", sha.as_str())
            );
            assert_ne!(found, expected);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert!(err.to_string().contains("run it again"));
    assert!(!blobs.join(&sha).exists());
    assert!(
        !blobs.join(format!("{sha}.incomplete")).exists(),
        "corrupt bytes must not be resumed"
    );
    assert!(std::fs::symlink_metadata(snapshot.join("model.safetensors")).is_err());

    // … and a small file against its git blob sha1.
    hub.set_corrupt("model.safetensors", false);
    let _ = std::fs::remove_dir_all(repo_dir(cache.path(), TINY));
    hub.set_corrupt("tokenizer.json", true);
    let err = fetch_id(&opts, TINY).unwrap_err();
    assert!(
        matches!(&err, HubError::Checksum { file, algorithm, .. } if file == "tokenizer.json" && algorithm == "git blob sha1"),
        "{err:?}"
    );
    assert!(!blobs
        .join(etag_of("tokenizer.json", &source["tokenizer.json"]))
        .exists());

    hub.set_corrupt("tokenizer.json", false);
    let path = fetch_id(&opts, TINY).unwrap();
    assert_eq!(
        std::fs::read(path.join("tokenizer.json")).unwrap(),
        source["tokenizer.json"]
    );
}

#[test]
fn gated_model_explains_how_to_get_access_and_never_leaks_the_token() {
    let hub = FakeHub::start(vec![tiny_repo("test-org/gated-llama", COMMIT).gated(GATED_TOKEN)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let err = fetch_id(&opts, "test-org/gated-llama").unwrap_err();
    assert!(matches!(err, HubError::Gated { status: 401, .. }), "{err:?}");
    let msg = err.to_string();
    for part in ["gated", "accept its licence", "HF_TOKEN", "finch hub login"] {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
    assert!(
        msg.contains(&format!("{}/test-org/gated-llama", hub.endpoint())),
        "{msg}"
    );

    let wrong = "hf_WRONGsecretTOKEN987654";
    let with_wrong = opts.clone().with_token(Token::new(wrong));
    let err = fetch_id(&with_wrong, "test-org/gated-llama").unwrap_err();
    assert!(matches!(err, HubError::Gated { status: 403, .. }), "{err:?}");
    let shown = format!("{err} {err:?} {err:#?} {with_wrong:?}");
    assert!(
        !shown.contains(wrong) && !shown.contains("WRONGsecret"),
        "token leaked: {shown}"
    );
    assert!(err.to_string().contains("token Finch sent has no access"), "{err}");

    hub.clear_requests();
    let with_right = opts.with_token(Token::new(GATED_TOKEN));
    let snapshot = fetch_id(&with_right, "test-org/gated-llama").unwrap();
    assert!(snapshot.join("model.safetensors").is_file());
    let requests = hub.requests();
    let bearer = format!("Bearer {GATED_TOKEN}");
    for r in &requests {
        let sent = r.header("authorization");
        if r.target.starts_with("/cdn/") {
            assert_eq!(sent, None, "the token must not follow a redirect to the CDN");
        } else {
            assert_eq!(sent, Some(bearer.as_str()), "{}", r.target);
        }
    }
    assert!(requests.iter().any(|r| r.target.starts_with("/cdn/")));
}

#[test]
fn unknown_model_and_revision_are_reported() {
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    // Anonymous callers get 401 + RepoNotFound from the Hub, token holders 404: both are "not found",
    // not "gated".
    let err = fetch_id(&opts, "test-org/no-such-model").unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains("`test-org/no-such-model` was not found"),
        "{err}"
    );
    let err = fetch_id(&opts.clone().with_token(Token::new("hf_any")), "test-org/no-such-model").unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
    let sent_token: Vec<bool> = hub
        .requests()
        .iter()
        .map(|r| r.header("authorization").is_some())
        .collect();
    assert_eq!(sent_token, [false, true]);

    let err = fetch(&opts, &DownloadRequest::new(TINY).with_revision("v9")).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("no revision `v9`"));

    let err = fetch_id(&opts, "../../etc").unwrap_err();
    assert!(matches!(err, HubError::InvalidId { .. }), "{err:?}");
    assert!(!cache.path().join("models--..").exists());
    assert!(repo_dir(cache.path(), "test-org/no-such-model").read_dir().is_err());
}

#[test]
fn second_load_makes_zero_network_requests() {
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let cancel = AtomicBool::new(false);
    let first = hub::resolve_model_with(TINY, &opts, &mut |_| {}, &cancel).unwrap();
    assert!(!hub.requests().is_empty());

    hub.clear_requests();
    let second = hub::resolve_model_with(TINY, &opts, &mut |_| {}, &cancel).unwrap();
    let pinned = hub::resolve_model_with(&format!("{TINY}@{COMMIT}"), &opts, &mut |_| {}, &cancel).unwrap();
    assert_eq!(first, second);
    assert_eq!(first, pinned);
    assert_eq!(hub.requests().len(), 0, "{:?}", hub.requests());

    // An explicit download checks the Hub once, but transfers nothing already in the snapshot.
    let mut transferred = 0;
    hub::download(
        &opts,
        &DownloadRequest::new(TINY),
        &mut |e| {
            if let DownloadProgress::FileStarted { .. } = e {
                transferred += 1;
            }
        },
        &cancel,
    )
    .unwrap();
    assert_eq!(transferred, 0);
    let targets: Vec<String> = hub.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, [format!("/api/models/{TINY}/revision/main")]);
}

/// Builds a cache folder the way Python's `huggingface_hub` writes one: blobs named by etag,
/// relative symlinks in the snapshot, `refs/main` without a newline, a `.no_exist` folder, and
/// one plain file in the snapshot (what a copy-based or Windows cache leaves).
fn write_python_style_cache(cache: &Path, id: &str, commit: &str) -> u64 {
    let repo = repo_dir(cache, id);
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join(".no_exist").join(commit)).unwrap();
    std::fs::write(repo.join(".no_exist").join(commit).join("special_tokens_map.json"), "").unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    let mut size_bytes = 0;
    for (name, bytes) in tiny_files() {
        size_bytes += bytes.len() as u64;
        if name == "tokenizer_config.json" {
            std::fs::write(snapshot.join(&name), &bytes).unwrap();
            continue;
        }
        let etag = etag_of(&name, &bytes);
        std::fs::write(blobs.join(&etag), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snapshot.join(&name)).unwrap();
    }
    size_bytes
}

#[cfg(unix)]
#[test]
fn cache_written_by_python_huggingface_hub_is_read_as_is() {
    let id = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let cache = tempfile::tempdir().unwrap();
    let size_bytes = write_python_style_cache(cache.path(), id, OTHER_COMMIT);
    let hub = FakeHub::start(vec![]);
    let opts = options(&hub, cache.path());

    let path = hub::resolve_model_with(id, &opts, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(path, repo_dir(cache.path(), id).join("snapshots").join(OTHER_COMMIT));
    assert_eq!(hub.requests().len(), 0);
    assert_eq!(
        ModelConfig::from_file(&path.join("config.json")).unwrap().family,
        Family::Llama
    );
    assert!(path.join("tokenizer_config.json").is_file());

    let listed = hub::list_cached(cache.path()).unwrap();
    assert_eq!(listed.len(), 1);
    let model = &listed[0];
    assert_eq!(model.id, id);
    assert_eq!(model.size_bytes, size_bytes);
    assert_eq!(model.revisions.len(), 1);
    assert_eq!(model.revisions[0].refs, ["main"]);
    assert!(model.revisions[0].usable);
    assert!(model.revisions[0].files.contains(&"model.safetensors".to_string()));

    // Finch's own downloads land in the same folders and share blobs with it.
    let hub = FakeHub::start(vec![tiny_repo(id, OTHER_COMMIT)]);
    let opts = options(&hub, cache.path());
    let again = fetch_id(&opts, id).unwrap();
    assert_eq!(again, path);
    assert!(!hub
        .requests()
        .iter()
        .any(|r| r.method == "GET" && r.target.contains("/resolve/")));
}

#[test]
fn offline_mode_uses_the_cache_only() {
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let offline = options(&hub, cache.path()).with_offline(true);
    let cancel = AtomicBool::new(false);

    let err = hub::resolve_model_with(TINY, &offline, &mut |_| {}, &cancel).unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }), "{err:?}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"));
    assert!(fetch_id(&offline, TINY).is_err());
    assert!(hub::search(&offline, &SearchQuery::new("tiny")).is_err());
    assert_eq!(hub.requests().len(), 0);

    let online_path = fetch_id(&options(&hub, cache.path()), TINY).unwrap();
    hub.clear_requests();
    assert_eq!(
        hub::resolve_model_with(TINY, &offline, &mut |_| {}, &cancel).unwrap(),
        online_path
    );
    assert_eq!(fetch_id(&offline, TINY).unwrap(), online_path);
    assert_eq!(hub.requests().len(), 0);
}

#[test]
fn network_failure_says_so_and_offers_the_cached_copy() {
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let cached = fetch_id(&options(&hub, cache.path()), TINY).unwrap();

    let dead = HubOptions::new(cache.path()).with_endpoint(dead_endpoint());
    let err = fetch_id(&dead, TINY).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("cannot reach http://127.0.0.1:"), "{msg}");
    assert!(
        msg.contains(&cached.display().to_string()) && msg.contains("HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    assert_eq!(err.cached_alternative().map(|s| s.path.clone()), Some(cached));
    assert_eq!(err.cached_alternative().map(|s| s.commit.as_str()), Some(COMMIT));

    let empty = tempfile::tempdir().unwrap();
    let err = fetch_id(&HubOptions::new(empty.path()).with_endpoint(dead_endpoint()), TINY).unwrap_err();
    assert!(matches!(err, HubError::Network { cached: None, .. }), "{err:?}");
    assert!(!err.to_string().contains("cached copy"));
}

#[test]
fn pickle_only_repo_is_refused_before_any_file_is_fetched() {
    let hub = FakeHub::start(vec![FakeRepo::new("test-org/old-llama", COMMIT)
        .file("config.json", "{\"model_type\": \"llama\"}")
        .file("pytorch_model.bin", vec![0u8; 128])]);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch_id(&options(&hub, cache.path()), "test-org/old-llama").unwrap_err();
    assert!(matches!(err, HubError::PickleOnly { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("never unpickles"),
        "{msg}"
    );
    assert!(hub.requests().iter().all(|r| r.target.starts_with("/api/models/")));
    assert!(!repo_dir(cache.path(), "test-org/old-llama").exists());
}

#[test]
fn gguf_only_repo_gets_one_preferred_quantisation() {
    let q8 = vec![8u8; 3000];
    let q4 = vec![4u8; 2000];
    let hub = FakeHub::start(vec![FakeRepo::new("test-org/tiny-gguf", COMMIT)
        .file("README.md", "gguf")
        .file("tiny.Q4_K_M.gguf", q4.clone())
        .file("tiny.Q8_0.gguf", q8.clone())
        .file("more/tiny.Q5_K_M.gguf", vec![5u8; 1000])]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let snapshot = fetch_id(&opts, "test-org/tiny-gguf").unwrap();
    let names: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, ["tiny.Q8_0.gguf"]);
    assert_eq!(std::fs::read(snapshot.join("tiny.Q8_0.gguf")).unwrap(), q8);

    let request = DownloadRequest::new("test-org/tiny-gguf").with_gguf_file(Some("tiny.Q4_K_M.gguf".into()));
    let snapshot = fetch(&opts, &request).unwrap();
    assert_eq!(std::fs::read(snapshot.join("tiny.Q4_K_M.gguf")).unwrap(), q4);

    // A file in a subfolder, named by its base name, links back with one more `..`.
    let request = DownloadRequest::new("test-org/tiny-gguf").with_gguf_file(Some("tiny.Q5_K_M.gguf".into()));
    let snapshot = fetch(&opts, &request).unwrap();
    let nested = snapshot.join("more/tiny.Q5_K_M.gguf");
    assert_eq!(std::fs::read(&nested).unwrap(), vec![5u8; 1000]);
    assert_eq!(
        std::fs::read_link(&nested).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", sha256_hex(&[5u8; 1000])))
    );

    let request = DownloadRequest::new("test-org/tiny-gguf").with_gguf_file(Some("tiny.Q2_K.gguf".into()));
    let err = fetch(&opts, &request).unwrap_err().to_string();
    assert!(
        err.contains("tiny.Q2_K.gguf") && err.contains("tiny.Q8_0.gguf"),
        "{err}"
    );
}

#[test]
fn sharded_safetensors_fetch_the_index_and_every_listed_shard() {
    let index = json!({
        "metadata": { "total_size": 5000 },
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    });
    let hub = FakeHub::start(vec![FakeRepo::new("test-org/sharded", COMMIT)
        .file("config.json", "{\"model_type\": \"qwen2\"}")
        .file("model.safetensors.index.json", index.to_string())
        .file("model-00001-of-00002.safetensors", vec![1u8; 3000])
        .file("model-00002-of-00002.safetensors", vec![2u8; 2000])
        .file("model-00003-of-00003.safetensors", vec![3u8; 10])]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let mut planned_total = 0;
    let snapshot = hub::download(
        &opts,
        &DownloadRequest::new("test-org/sharded"),
        &mut |e| {
            if let DownloadProgress::Planned { total_bytes, .. } = e {
                planned_total = total_bytes;
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(snapshot.join("model-00001-of-00002.safetensors")).unwrap(),
        vec![1u8; 3000]
    );
    assert_eq!(
        std::fs::read(snapshot.join("model-00002-of-00002.safetensors")).unwrap(),
        vec![2u8; 2000]
    );
    assert!(
        !snapshot.join("model-00003-of-00003.safetensors").exists(),
        "not listed in the index"
    );
    assert_eq!(planned_total, 3000 + 2000 + 23 + index.to_string().len() as u64);
    assert!(Hub::new(opts)
        .cached_snapshot("test-org/sharded", "main")
        .unwrap()
        .is_some());
}

#[test]
fn cached_models_are_listed_with_their_size_and_removed() {
    let hub = FakeHub::start(vec![
        tiny_repo(TINY, COMMIT),
        tiny_repo("test-org/tiny-two", OTHER_COMMIT),
    ]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    fetch_id(&opts, TINY).unwrap();
    fetch_id(&opts, "test-org/tiny-two").unwrap();
    let source = tiny_files();
    let model_bytes: u64 = NEEDED.iter().map(|n| source[*n].len() as u64).sum();

    let listed = hub::list_cached(cache.path()).unwrap();
    let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [TINY, "test-org/tiny-two"]);
    assert_eq!(listed[0].size_bytes, model_bytes);
    assert_eq!(listed[1].revisions[0].commit, OTHER_COMMIT);
    assert_eq!(listed[1].revisions[0].refs, ["main"]);

    assert_eq!(hub::remove(cache.path(), TINY).unwrap(), model_bytes);
    assert_eq!(hub::list_cached(cache.path()).unwrap().len(), 1);
    let err = hub::remove(cache.path(), TINY).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
}

#[test]
fn cancelling_keeps_the_partial_file_and_the_next_call_finishes_it() {
    let source = tiny_files();
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let cancel = AtomicBool::new(false);
    let err = hub::download(
        &opts,
        &DownloadRequest::new(TINY),
        &mut |e| {
            if matches!(&e, DownloadProgress::Bytes { file, .. } if file == "model.safetensors") {
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, HubError::Cancelled { .. }), "{err:?}");
    let sha = sha256_hex(&source["model.safetensors"]);
    let partial = repo_dir(cache.path(), TINY)
        .join("blobs")
        .join(format!("{sha}.incomplete"));
    let partial_bytes = std::fs::metadata(&partial).unwrap().len();
    assert!(
        partial_bytes > 0 && partial_bytes < source["model.safetensors"].len() as u64,
        "{partial_bytes}"
    );
    assert!(std::fs::symlink_metadata(
        repo_dir(cache.path(), TINY)
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors")
    )
    .is_err());

    let path = fetch_id(&opts, TINY).unwrap();
    assert_eq!(
        std::fs::read(path.join("model.safetensors")).unwrap(),
        source["model.safetensors"]
    );
    assert!(!partial.exists());
}

#[test]
fn a_download_waits_while_another_process_writes_the_same_blob() {
    let source = tiny_files();
    let weights = source["model.safetensors"].clone();
    let sha = sha256_hex(&weights);
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    // Stand in for Python's huggingface_hub (or another Finch) holding the blob's lock file.
    let lock_dir = cache.path().join(".locks").join("models--test-org--tiny-llama");
    std::fs::create_dir_all(&lock_dir).unwrap();
    let held = std::fs::File::create(lock_dir.join(format!("{sha}.lock"))).unwrap();
    fs4::FileExt::lock(&held).unwrap();

    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("download".into())
        .spawn(move || {
            hub::download(
                &opts,
                &DownloadRequest::new(TINY),
                &mut |e| {
                    let _ = events_tx.send(e);
                },
                &AtomicBool::new(false),
            )
        })
        .unwrap();
    loop {
        let event = events_rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap();
        if matches!(&event, DownloadProgress::WaitingForLock { file, .. } if file == "model.safetensors") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let blobs = repo_dir(cache.path(), TINY).join("blobs");
    assert!(
        !blobs.join(format!("{sha}.incomplete")).exists(),
        "wrote while the lock was held"
    );

    // The other process finishes the blob and releases the lock: nothing is transferred again.
    std::fs::write(blobs.join(&sha), &weights).unwrap();
    drop(held);
    let path = worker.join().unwrap().unwrap();
    assert_eq!(std::fs::read(path.join("model.safetensors")).unwrap(), weights);
    assert!(!hub.requests().iter().any(|r| r.target.starts_with("/cdn/")));
}

mod cli {
    use super::*;
    use std::process::{Command, Output, Stdio};

    /// Runs the `finch` binary with a clean Hugging Face environment rooted in `home`.
    fn finch(home: &Path, endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_finch"));
        cmd.args(args)
            .env("HOME", home)
            .env("HF_HOME", home.join("hf"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("HF_ENDPOINT", endpoint)
            .env_remove("HF_TOKEN")
            .env_remove("HUGGING_FACE_HUB_TOKEN")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("XDG_CACHE_HOME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).to_string()
    }

    #[test]
    fn download_list_search_and_rm_round_trip() {
        let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT).search_fields(json!({
            "downloads": 5, "tags": ["safetensors", "llama", "license:apache-2.0"],
            "config": { "model_type": "llama" }, "safetensors": { "total": 1000 },
        }))]);
        let home = tempfile::tempdir().unwrap();
        let ep = hub.endpoint();

        let out = finch(home.path(), &ep, &["hub", "download", TINY], None);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
        let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let path = PathBuf::from(result["path"].as_str().unwrap());
        assert_eq!(
            path,
            home.path()
                .join("hf/hub/models--test-org--tiny-llama/snapshots")
                .join(COMMIT)
        );
        assert!(path.join("model.safetensors").is_file());
        assert_eq!(result["commit"], COMMIT);
        assert!(
            stderr.contains("100%") && stderr.contains("/s") && stderr.contains("ETA"),
            "{stderr}"
        );

        let out = finch(home.path(), &ep, &["hub", "list", "--json"], None);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(listed[0]["id"], TINY);

        let out = finch(home.path(), &ep, &["hub", "search", "tiny"], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let table = text(&out.stdout);
        assert!(
            table.contains(TINY) && table.contains("apache-2.0") && table.contains("1.0K params"),
            "{table}"
        );

        let out = finch(home.path(), &ep, &["hub", "rm", TINY], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(!path.exists());
        let out = finch(home.path(), &ep, &["hub", "rm", TINY], None);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("is not in the cache"));
    }

    #[cfg(unix)]
    #[test]
    fn login_saves_a_private_token_and_gated_errors_never_print_it() {
        use std::os::unix::fs::PermissionsExt;
        let hub = FakeHub::start(vec![tiny_repo("test-org/gated-llama", COMMIT).gated(GATED_TOKEN)]);
        let home = tempfile::tempdir().unwrap();
        let ep = hub.endpoint();

        let out = finch(home.path(), &ep, &["hub", "download", "test-org/gated-llama"], None);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("gated or private"), "{}", text(&out.stderr));

        let out = finch(home.path(), &ep, &["hub", "login"], Some("hf_notTheRightOne\n"));
        assert!(!out.status.success());
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            shown.contains("refused this token") && !shown.contains("notTheRightOne"),
            "{shown}"
        );

        let out = finch(home.path(), &ep, &["hub", "login"], Some(&format!("{GATED_TOKEN}\n")));
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{shown}");
        assert!(!shown.contains(GATED_TOKEN), "token printed: {shown}");
        let saved = home.path().join("config/finch/hf_token");
        assert_eq!(std::fs::read_to_string(&saved).unwrap(), GATED_TOKEN);
        assert_eq!(std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777, 0o600);

        // The saved token is used by the next command.
        let out = finch(home.path(), &ep, &["hub", "download", "test-org/gated-llama"], None);
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{shown}");
        assert!(!shown.contains(GATED_TOKEN));
    }
}

/// Python's `huggingface_hub` and Finch share one cache in both directions. Needs a Python with
/// `huggingface_hub` installed, named by `FINCH_HF_PYTHON` (e.g. a venv's `bin/python`).
#[cfg(unix)]
#[test]
fn python_huggingface_hub_shares_the_cache_both_ways() {
    let Ok(python) = std::env::var("FINCH_HF_PYTHON") else {
        eprintln!("skipped: set FINCH_HF_PYTHON to a Python that has huggingface_hub installed");
        return;
    };
    let hub = FakeHub::start(vec![tiny_repo(TINY, COMMIT)]);
    let run_python = |cache: &Path, offline: bool, script: &str| -> serde_json::Value {
        let out = std::process::Command::new(&python)
            .args(["-c", script])
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HUB_CACHE", cache)
            .env("HF_HOME", cache.join("home"))
            .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env("HF_HUB_DISABLE_XET", "1")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "python failed:\n{stdout}\n{}\nrequests: {:#?}",
            String::from_utf8_lossy(&out.stderr),
            hub.requests()
                .iter()
                .map(|r| (&r.method, &r.target))
                .collect::<Vec<_>>()
        );
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
    };

    // Python downloads; Finch finds it without a single request.
    let python_cache = tempfile::tempdir().unwrap();
    let got = run_python(
        python_cache.path(),
        false,
        &format!(
            "import json; from huggingface_hub import snapshot_download; \
             print(json.dumps(snapshot_download('{TINY}', allow_patterns=['*.json', '*.safetensors'])))"
        ),
    );
    hub.clear_requests();
    let opts = options(&hub, python_cache.path());
    let path = hub::resolve_model_with(TINY, &opts, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(path, PathBuf::from(got.as_str().unwrap()));
    assert_eq!(hub.requests().len(), 0);
    let expected_bytes: u64 = tiny_files().values().map(|b| b.len() as u64).sum();
    assert_eq!(
        hub::list_cached(python_cache.path()).unwrap()[0].size_bytes,
        expected_bytes
    );

    // Finch downloads; Python finds it offline and measures it the same way.
    let finch_cache = tempfile::tempdir().unwrap();
    let finch_path = fetch_id(&options(&hub, finch_cache.path()), TINY).unwrap();
    let report = run_python(
        finch_cache.path(),
        true,
        &format!(
            "import json; from huggingface_hub import hf_hub_download, scan_cache_dir; \
             f = hf_hub_download('{TINY}', 'model.safetensors'); \
             info = scan_cache_dir(); repo = list(info.repos)[0]; rev = list(repo.revisions)[0]; \
             print(json.dumps({{'file': f, 'repo_id': repo.repo_id, 'size': repo.size_on_disk, \
             'commit': rev.commit_hash, 'refs': sorted(rev.refs), 'warnings': [str(w) for w in info.warnings]}}))"
        ),
    );
    assert_eq!(
        report["file"],
        finch_path.join("model.safetensors").display().to_string()
    );
    assert_eq!(report["repo_id"], TINY);
    assert_eq!(report["commit"], COMMIT);
    assert_eq!(report["refs"], json!(["main"]));
    assert_eq!(report["warnings"], json!([]));
    assert_eq!(
        report["size"],
        hub::list_cached(finch_cache.path()).unwrap()[0].size_bytes
    );
}
