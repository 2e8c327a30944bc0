//! lockstep's CIM-XML/WBEM endpoint: DMTF DSP0200 (CIM operations over HTTP) and DSP0201
//! (CIM-XML) with the DMTF virtualization profiles, so that WBEM clients (pywbem, pywbemcli,
//! sblim-wbemcli) query and manage the host. Everything it knows and does goes through the
//! host's [`HostControl`].
//!
//! Wiring: [`start`] with the host, a [`CimConfig`] and the host's state folder; the returned
//! [`CimServer`] serves on its own runtime thread until dropped.

pub mod assoc;
pub mod auth;
mod brake;
mod cache;
pub mod cimom;
pub mod config;
mod connection;
pub mod error;
pub mod fake_host;
mod http;
pub mod indications;
mod login_pool;
mod memory;
pub mod methods;
pub mod migration;
pub mod model;
pub mod ops;
pub mod pull;
pub mod query;
pub mod redundancy;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
pub mod value;
pub mod xml;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use lockstep_api::control::HostControl;
use tokio::sync::watch;

pub use auth::hash_password;
pub use config::{CimConfig, CimLogins, CimTimeouts, CimUser};
pub use error::CimError;

/// A running endpoint; dropping it stops it.
pub struct CimServer {
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    stop: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
    cimom: Arc<cimom::Cimom>,
}

impl CimServer {
    /// The HTTPS address actually bound (useful with port 0).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    /// The plain HTTP address actually bound.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Stops serving and waits for the server thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        self.cimom.indications.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CimServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, CimError> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|source| CimError::Listen { addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| CimError::Listen { addr, source })?;
    Ok(l)
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Starts the endpoint: binds its ports, prepares the certificate (generating a self-signed
/// one into `<state_dir>/cim/` when none is configured) and serves on its own thread.
pub fn start(
    host: Arc<dyn HostControl>,
    config: CimConfig,
    state_dir: &Path,
) -> Result<CimServer, CimError> {
    config.check().map_err(CimError::Config)?;
    let hostname = config.hostname.clone().unwrap_or_else(machine_hostname);
    let cim_dir = state_dir.join("cim");
    // The folder holds the private key: 0700 whatever the umask.
    lockstep_api::private_fs::create_private_dir(&cim_dir).map_err(|source| CimError::Io {
        path: cim_dir.clone(),
        source,
    })?;
    let cimom = cimom::Cimom::new(
        host,
        hostname.clone(),
        Some(cim_dir),
        cimom::Limits::default(),
    )?;
    let tls = match config.https {
        Some(_) => {
            let (cert, key) = tls::certificate_files(
                config.cert_path.as_deref(),
                config.key_path.as_deref(),
                state_dir,
                &hostname,
            )?;
            Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                &cert, &key,
            )?))
        }
        None => None,
    };
    let https_listener = config.https.map(bind).transpose()?;
    let http_listener = config.http.map(bind).transpose()?;
    let local = |l: &Option<std::net::TcpListener>| -> Result<Option<SocketAddr>, CimError> {
        l.as_ref()
            .map(|l| {
                l.local_addr().map_err(|source| CimError::Listen {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })
            })
            .transpose()
    };
    let (https, http) = (local(&https_listener)?, local(&http_listener)?);
    let secs = std::time::Duration::from_secs;
    let shared = Arc::new(http::Shared {
        cimom: Arc::clone(&cimom),
        auth: auth::Authenticator::new(
            config.users.clone(),
            config.allow_anonymous,
            &config.logins,
        )?,
        max_body: config.max_body_bytes,
        admission: Arc::new(connection::Admission::new(
            config.max_connections,
            config.max_connections_per_address,
        )),
        deadlines: connection::Deadlines {
            header: secs(config.timeouts.header_secs),
            body: secs(config.timeouts.body_secs),
            idle: secs(config.timeouts.idle_secs),
        },
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .max_blocking_threads(4)
        .thread_name("cim")
        .on_thread_start(|| lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Cim))
        .enable_all()
        .build()
        .map_err(CimError::Runtime)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    indications::Indications::start(&cimom);
    let thread = std::thread::Builder::new()
        .name("cim-server".into())
        .spawn(move || {
            lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Cim);
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, tls) in [(https_listener, tls), (http_listener, None)] {
                    let Some(listener) = listener else { continue };
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => tasks.push(tokio::spawn(connection::accept_loop(
                            l,
                            tls,
                            Arc::clone(&shared),
                            stop_rx.clone(),
                        ))),
                        Err(e) => log::error!("cim: cannot serve a listener: {e}"),
                    }
                }
                let mut stop = stop_rx.clone();
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {
                            // Quiet for a moment after a burst: give the memory back.
                            tokio::task::spawn_blocking(memory::trim_if_quiet);
                        }
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        })
        .map_err(CimError::Runtime)?;
    if let Some(a) = https {
        log::info!("cim: serving CIM-XML over HTTPS on {a}");
    }
    if let Some(a) = http {
        log::info!("cim: serving CIM-XML over HTTP on {a}");
    }
    Ok(CimServer {
        https,
        http,
        stop: Some(stop_tx),
        thread: Some(thread),
        cimom,
    })
}
