//! Helpers for integration tests (feature `test-support`): an isolated PostgreSQL schema or
//! SQLite file per test, a unique Redis key prefix per test, and a private `redis-server` that a
//! test may stop and restart without disturbing the others.
//!
//! `LOADLAB_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and
//! `LOADLAB_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) point at the shared servers.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;

use crate::db::DbSettings;

/// The shared PostgreSQL server used by tests.
pub fn postgres_url() -> String {
    std::env::var("LOADLAB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The shared Redis server used by tests.
pub fn redis_url() -> String {
    std::env::var("LOADLAB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A random lower-case token for names.
pub fn unique_suffix() -> String {
    let mut rng = rand::rng();
    (0..12)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// A Redis key prefix no other test uses.
pub fn redis_prefix() -> String {
    format!("loadlab-test:{}:", unique_suffix())
}

/// Database settings for a fresh, empty PostgreSQL schema (`test_<random>`). Leftover schemas
/// of crashed runs are dropped by `scripts/test` before each run.
pub fn postgres_db() -> DbSettings {
    DbSettings {
        url: postgres_url(),
        schema: format!("test_{}", unique_suffix()),
        max_connections: 8,
    }
}

/// Database settings for a fresh SQLite file in the temp directory.
pub fn sqlite_db() -> DbSettings {
    let path = std::env::temp_dir().join(format!("loadlab-test-{}.db", unique_suffix()));
    DbSettings {
        url: format!("sqlite://{}?mode=rwc", path.display()),
        schema: String::new(),
        max_connections: 4,
    }
}

/// A free TCP port on loopback (the listener is closed before returning).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on loopback")
}

/// A private `redis-server` process on its own port, for fault tests that stop or restart it.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("loadlab-redis-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (no save: its data is gone, as after a crash of a cache node).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed? scripts/test installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not start", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL server (its own data directory and port), for fault tests that stop and
/// restart the database. Runs as the `postgres` OS user when the tests run as root.
pub struct PostgresServer {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl PostgresServer {
    /// Initialises a data directory and starts the server; waits until it accepts connections.
    pub fn start() -> PostgresServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|dirs| {
                dirs.filter_map(Result::ok)
                    .map(|d| d.path().join("bin"))
                    .filter(|p| p.join("postgres").exists())
                    .max()
            })
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(format!("loadlab-pg-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("create data dir");
        let server = PostgresServer {
            port: free_port(),
            dir,
            bin,
            child: None,
        };
        server.chown_to_postgres();
        let status = server
            .as_postgres(&server.bin.join("initdb"))
            .args([
                "-D",
                &server.data_dir(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let mut server = server;
        server.restart();
        server
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    fn chown_to_postgres(&self) {
        if Self::is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres", &self.dir.display().to_string()])
                .status();
        }
    }

    fn as_postgres(&self, program: &std::path::Path) -> Command {
        if Self::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Kills the server abruptly (its data survives, as after a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // `runuser` may leave the postmaster behind; stop it by its pid file.
        let pid_file = self.dir.join("data").join("postmaster.pid");
        if let Ok(text) = std::fs::read_to_string(&pid_file)
            && let Some(pid) = text.lines().next()
        {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_file(pid_file);
        }
    }

    /// Starts (again) on the same port and data, and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let child = self
            .as_postgres(&self.bin.join("postgres"))
            .args([
                "-D",
                &self.data_dir(),
                "-p",
                &self.port.to_string(),
                "-k",
                &self.dir.display().to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        for _ in 0..300 {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private postgres on port {} did not start", self.port);
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
