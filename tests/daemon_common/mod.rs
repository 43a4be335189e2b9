//! Helpers shared by the daemon tests: a real mosquitto on a free port, a recording
//! subscriber, the node under test, its config, images dropped into the watched folder.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn mosquitto_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Skips the test (with a message) when mosquitto is not installed.
macro_rules! need_mosquitto {
    () => {
        match $crate::daemon_common::mosquitto_bin() {
            Some(p) => p,
            None => {
                eprintln!("SKIPPED: `mosquitto` is not installed (apt-get install mosquitto)");
                return;
            }
        }
    };
}

/// A scratch folder with the watched folder `in/` (created) and the spool path `spool`.
pub fn folders() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("a temporary folder");
    let (watch, spool) = (tmp.path().join("in"), tmp.path().join("spool"));
    std::fs::create_dir_all(&watch).expect("the watched folder");
    (tmp, watch, spool)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// [`wait_until`], showing the node's log when it times out.
pub fn wait_logged(node: &Node, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}; node log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub struct Broker {
    pub child: Child,
}

impl Broker {
    /// mosquitto on 127.0.0.1:`port`, without persistence, plus `extra` config lines.
    pub fn start(bin: &Path, dir: &Path, port: u16, extra: &str) -> Broker {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let anon = if extra.contains("allow_anonymous") { "" } else { "allow_anonymous true\n" };
        // `user root`: mosquitto started as root would otherwise switch to a user that cannot
        // read the test's private temporary folder (ignored when not started as root).
        let text = format!("user root\nlistener {port} 127.0.0.1\n{anon}persistence false\n{extra}\n");
        std::fs::write(&conf, text).unwrap();
        let log = std::fs::File::create(dir.join(format!("mosquitto-{port}.log"))).unwrap();
        let child = Command::new(bin).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let b = Broker { child };
        wait_until("mosquitto to listen", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        b
    }
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A subscriber that records every message, resubscribing after each reconnect.
/// Every message received: topic, payload, retain flag.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

pub struct Sub {
    pub msgs: Received,
    pub client: Client,
    pub subacked: Arc<Mutex<u32>>,
}

impl Sub {
    pub fn start(port: u16, filters: &[&str]) -> Sub {
        let n = filters.len() as u32;
        let mut opts = MqttOptions::new(format!("test-sub-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 64);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subacked = Arc::new(Mutex::new(0));
        let (m, s, c, filters) = (msgs.clone(), subacked.clone(), client.clone(), filters.iter().map(|f| f.to_string()).collect::<Vec<_>>());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in &filters {
                            let _ = c.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => *s.lock().unwrap() += 1,
                    Ok(Event::Incoming(Packet::Publish(p))) => m.lock().unwrap().push((p.topic.clone(), p.payload.to_vec(), p.retain)),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        let sub = Sub { msgs, client, subacked };
        wait_until("the test subscriber", Duration::from_secs(10), || *sub.subacked.lock().unwrap() >= n);
        sub
    }
    pub fn on(&self, topic: &str) -> Vec<(Vec<u8>, bool)> {
        self.msgs.lock().unwrap().iter().filter(|(t, _, _)| t == topic).map(|(_, p, r)| (p.clone(), *r)).collect()
    }
    /// Caption messages, duplicates (same message id) removed, in first-seen order.
    pub fn captions(&self, topic: &str) -> Vec<Value> {
        let mut seen = HashSet::new();
        self.on(topic)
            .into_iter()
            .map(|(p, _)| serde_json::from_slice::<Value>(&p).expect("caption payload is JSON"))
            .filter(|v| seen.insert(v["id"].as_str().unwrap_or("").to_string()))
            .collect()
    }
    pub fn publish(&self, topic: &str, payload: &str) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec()).unwrap();
    }
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, true, payload).unwrap();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

pub struct Node {
    pub child: Child,
    pub stderr: PathBuf,
    pub stdout: PathBuf,
}

impl Node {
    pub fn start(dir: &Path, name: &str, config: &str) -> Node {
        Self::start_with(dir, name, config, &[])
    }
    /// The same with extra environment variables (e.g. `VITGPT2_FAULT`).
    pub fn start_with(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Node {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let (stdout, stderr) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let child = Command::new(env!("CARGO_BIN_EXE_vitgpt2-node"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Node { child, stderr, stdout }
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node config: watched folder, spool, broker port, and extra `[mqtt]` and `[source]` lines.
/// Files are dropped atomically (copy, then rename), so no settle time is needed unless
/// `source_extra` sets one.
pub fn config(watch: &Path, spool: &Path, port: u16, mqtt_extra: &str, source_extra: &str) -> String {
    let settle = if source_extra.contains("settle_ms") { "" } else { "settle_ms = 0" };
    format!(
        r#"[model]
dir = "{model}"

[source]
kind = "directory"
path = "{watch}"
poll_ms = 20
{settle}
{source_extra}

[schedule]
interval_ms = 0
queue = 4

[mqtt]
host = "127.0.0.1"
port = {port}
prefix = "t"
device_id = "cam1"
keep_alive_s = 5
stats_interval_s = 1
backoff_min_ms = 200
backoff_max_ms = 1000
shutdown_flush_s = 3
{mqtt_extra}

[spool]
dir = "{spool}"
fsync = "always"

[log]
level = "info"
"#,
        model = fixtures().join("tiny-vit-gpt2").display(),
        watch = watch.display(),
        spool = spool.display(),
    )
}

pub const IMAGES: [&str; 4] = ["street.jpg", "garden_444.jpg", "wide.webp", "tiny.bmp"];

/// Puts `n` images into the watched folder as `<prefix>-0001.<ext>`, ….
pub fn drop_images(watch: &Path, prefix: &str, n: usize) {
    for i in 0..n {
        let src = fixtures().join("images").join(IMAGES[i % IMAGES.len()]);
        let ext = src.extension().unwrap().to_str().unwrap().to_string();
        // Copy then rename, as a camera writing files should, so no half-written file is seen.
        let tmp = watch.join(format!(".{prefix}-{i:04}.part"));
        std::fs::copy(&src, &tmp).unwrap();
        std::fs::rename(&tmp, watch.join(format!("{prefix}-{i:04}.{ext}"))).unwrap();
    }
}

pub fn spooled(spool: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(spool).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "msg")).collect()).unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok()).collect()
}

pub fn sources(caps: &[Value]) -> Vec<String> {
    caps.iter().map(|c| c["source"].as_str().unwrap().rsplit('/').next().unwrap().to_string()).collect()
}

pub fn expected(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let ext = Path::new(IMAGES[i % IMAGES.len()]).extension().unwrap().to_str().unwrap().to_string();
            format!("{prefix}-{i:04}.{ext}")
        })
        .collect()
}

pub fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a broker certificate for 127.0.0.1 signed by it, and an unrelated second CA.
pub fn make_certs(dir: &Path) {
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"]);
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=other-ca"]);
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(dir, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
}

/// Puts `a-0000.jpg`, a JPEG whose 250-character name makes its caption message much larger
/// (the source name is part of the message), `z-0000.jpg` and `z-0001.jpg` into `watch`, and
/// captions them once with no broker to measure. Returns the big file's name and the size of
/// the largest normal message.
pub fn normal_and_big_images(dir: &Path, watch: &Path) -> (String, usize) {
    drop_images(watch, "a", 1);
    let big = format!("{}.jpg", "x".repeat(246)); // 250 bytes: ext4 allows 255
    std::fs::copy(fixtures().join("images/street.jpg"), watch.join(&big)).unwrap();
    drop_images(watch, "z", 2);
    let probe_spool = dir.join("probe-spool");
    let probe = Node::start(dir, "probe", &config(watch, &probe_spool, free_port(), "", ""));
    wait_until("probe captions", Duration::from_secs(30), || spooled(&probe_spool).len() == 4);
    drop(probe);
    let sizes: Vec<usize> = spooled(&probe_spool).iter().map(|v| v.to_string().len()).collect();
    let normal = sizes.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, s)| *s).max().unwrap();
    assert!(sizes[1] > normal + 200, "{sizes:?}");
    (big, normal)
}
