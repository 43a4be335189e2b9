//! Every bad field of node.toml gives an error naming the file, the line and the field; the
//! shipped configs are valid.

use std::path::PathBuf;
use std::process::Command;

use vitgpt2::node::config::{NodeConfig, SourceKind};

// Tables left empty so that each case can add its own key without a duplicate.
const GOOD: &str = r#"[model]
dir = "m"

[source]

[schedule]

[mqtt]

[spool]

[log]
"#;

/// Replaces `key = ...` (or appends it to `[table]`) in GOOD and returns the error.
fn err_with(table: &str, line: &str) -> String {
    let text = GOOD.replace(&format!("[{table}]\n"), &format!("[{table}]\n{line}\n"));
    match NodeConfig::parse(&text, "node.toml") {
        Ok(_) => panic!("`[{table}] {line}` was accepted"),
        Err(e) => e.to_string(),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle in text") + 1
}

#[test]
fn good_config_parses_with_defaults() {
    let cfg = NodeConfig::parse(GOOD, "node.toml").unwrap();
    assert_eq!(cfg.source.kind, SourceKind::Synthetic);
    assert_eq!(cfg.mqtt.qos, 1);
    assert_eq!(cfg.topic("caption"), "vitgpt2/node/caption");
    assert_eq!(cfg.client_id(), "vitgpt2-node");
}

#[test]
fn every_bad_field_names_file_line_and_field() {
    // (table, line, field named in the error, words expected in the message)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("model", "threads = \"two\"", "model.threads", "invalid type"),
        ("model", "precision = \"fp16\"", "model.precision", "fp32"),
        ("model", "colour = 1", "colour", "unknown field"),
        ("source", "kind = \"webcam\"", "source.kind", "unknown variant"),
        ("source", "poll_ms = 0", "source.poll_ms", "greater than 0"),
        ("source", "rate = -1.0", "source.rate", "greater than 0"),
        ("source", "width = 0", "source.width", "greater than 0"),
        ("source", "format = \"h264\"", "source.format", "unknown variant"),
        ("source", "loop = \"yes\"", "source.loop", "invalid type"),
        ("schedule", "change_threshold = 1.5", "schedule.change_threshold", "between 0 and 1"),
        ("schedule", "queue = 0", "schedule.queue", "greater than 0"),
        ("schedule", "interval_ms = -5", "schedule.interval_ms", "invalid value"),
        ("mqtt", "qos = 3", "mqtt.qos", "0, 1 or 2"),
        ("mqtt", "port = 70000", "mqtt.port", "invalid value"),
        ("mqtt", "port = \"x\"", "mqtt.port", "invalid type"),
        ("mqtt", "keep_alive_s = 1", "mqtt.keep_alive_s", "5..3600"),
        ("mqtt", "prefix = \"a/#\"", "mqtt.prefix", "without +"),
        ("mqtt", "device_id = \"\"", "mqtt.device_id", "non-empty"),
        ("mqtt", "host = \" \"", "mqtt.host", "must not be empty"),
        ("mqtt", "inflight = 0", "mqtt.inflight", "greater than 0"),
        ("mqtt", "passwd = \"x\"", "passwd", "unknown field"),
        ("spool", "fsync = \"sometimes\"", "spool.fsync", "unknown variant"),
        ("spool", "max_messages = 0", "spool.max_messages", "greater than 0"),
        ("log", "stdout = 2", "log.stdout", "invalid type"),
    ];
    for (table, line, field, words) in cases {
        let text = GOOD.replace(&format!("[{table}]\n"), &format!("[{table}]\n{line}\n"));
        let want_line = line_of(&text, line);
        let err = err_with(table, line);
        assert!(err.starts_with(&format!("node.toml:{want_line}:")), "`{line}`: wrong position in: {err}");
        assert!(err.contains(field), "`{line}`: field `{field}` not named in: {err}");
        assert!(err.contains(words), "`{line}`: `{words}` not in: {err}");
        assert!(!err.contains('\n'), "multi-line error: {err}");
    }
}

#[test]
fn cross_field_errors_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("[source]\nkind = \"directory\"\n", "source.path", "folder to watch"),
        ("[source]\nkind = \"files\"\n", "source.files", "at least one"),
        ("[mqtt]\nbackoff_min_ms = 5000\nbackoff_max_ms = 100\n", "mqtt.backoff_max_ms", "at least"),
        ("[mqtt]\npassword_env = \"P\"\n", "mqtt.username", "user name"),
        ("[mqtt]\nusername = \"u\"\npassword_env = \"P\"\npassword_file = \"f\"\n", "mqtt.password_env", "not both"),
        ("[mqtt.tls]\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\n", "mqtt.tls.client_key", "go together"),
        ("[log]\nlevel = \"loud=[\"\n", "log.level", "log filter"),
        ("[model.generation]\nearly_stopping = \"maybe\"\n", "model.generation.early_stopping", "never"),
    ];
    for (extra, field, words) in cases {
        let text = format!("[model]\ndir = \"m\"\n{extra}");
        let err = NodeConfig::parse(&text, "node.toml").expect_err(extra).to_string();
        assert!(err.starts_with("node.toml:"), "{err}");
        assert!(err.contains(field) && err.contains(words), "`{extra}`: {err}");
    }
    // A missing required table.
    let err = NodeConfig::parse("[source]\nkind = \"synthetic\"\n", "node.toml").unwrap_err().to_string();
    assert!(err.contains("model"), "{err}");
}

#[test]
fn shipped_configs_are_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware-config");
    let node = NodeConfig::load(&root.join("node.toml")).unwrap();
    assert_eq!(node.spool.max_messages, 10000);
    let demo = NodeConfig::load(&root.join("demo.toml")).unwrap();
    assert_eq!(demo.source.kind, SourceKind::Files);
    assert!(demo.model.dir.join("config.json").is_file(), "demo model: {}", demo.model.dir.display());
    for f in &demo.source.files {
        assert!(PathBuf::from(f).is_file(), "demo frame {f}");
    }
}

#[test]
fn check_config_command() {
    let bin = env!("CARGO_BIN_EXE_vitgpt2-node");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware-config");
    let ok = Command::new(bin).arg("check-config").arg(root.join("demo.toml")).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[model]\ndir = \".\"\n\n[mqtt]\nqos = 7\n").unwrap();
    let out = Command::new(bin).arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:", bad.display())) && err.contains("mqtt.qos"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `check-config` as a pre-deploy lint: paths missing here are warnings (exit 0); `--strict`
/// opens the model bundle, the spool folder, the password file and the camera and fails on
/// any of them (exit 2), one line each.
#[test]
fn check_config_warns_about_missing_paths_and_strict_opens_everything() {
    let bin = env!("CARGO_BIN_EXE_vitgpt2-node");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("board.toml");
    // A file where the spool's parent folder should be: cannot be created, even by root.
    std::fs::write(dir.path().join("blocker"), "").unwrap();
    std::fs::write(
        &cfg,
        "[model]\ndir = \"/nonexistent/model\"\n\n[source]\nkind = \"camera\"\ndevice = 57\n\n\
         [mqtt]\nusername = \"node\"\npassword_file = \"/nonexistent/secret\"\n\n[spool]\ndir = \"blocker/spool\"\n",
    )
    .unwrap();
    let run = |strict: bool| {
        let mut c = Command::new(bin);
        c.arg("check-config");
        if strict {
            c.arg("--strict");
        }
        let out = c.arg(&cfg).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let fields = ["model.dir", "source.device", "mqtt.password_file", "spool.dir"];

    let (code, out, err) = run(false);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (4 warnings)"), "{out}");
    for f in fields {
        assert!(err.lines().any(|l| l.starts_with("warning: ") && l.contains(f) && l.contains("does not exist")), "{f} in: {err}");
    }

    let (code, _, err) = run(true);
    assert_eq!(code, Some(2), "{err}");
    for f in fields {
        assert!(err.lines().any(|l| l.starts_with("error: ") && l.contains(f)), "{f} in: {err}");
    }
    assert!(err.contains("/dev/video57"), "{err}");

    // The demo opens fine, strictly: its bundle loads, its spool folder takes files.
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware-config/demo.toml");
    let ok = Command::new(bin).args(["check-config", "--strict"]).arg(&demo).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("loads (2 graph file(s))"), "{out}");
    assert_eq!(out.lines().last(), Some(format!("{}: ok", demo.display()).as_str()), "no warnings for the demo: {out}");

    // A file source faster than the captions is a warning (latency would grow without end).
    let fast = dir.path().join("fast.toml");
    let text = std::fs::read_to_string(&demo).unwrap().replace("rate = 1.0", "rate = 4.0").replace("../models", &format!("{}/models", env!("CARGO_MANIFEST_DIR")));
    std::fs::write(&fast, text).unwrap();
    let out = Command::new(bin).arg("check-config").arg(&fast).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("source.rate"), "{}", String::from_utf8_lossy(&out.stderr));
}
