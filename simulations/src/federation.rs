//! Building blocks for running a federation in one process over real QUIC and mTLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::Context;
use flotilla_client::driver::ClientOptions;
use flotilla_client::{Evaluation, LocalUpdate, Trainer};
use flotilla_crypto::pki::{Identity, PkiDir, load_certs};
use flotilla_protocol::Params;
use flotilla_protocol::wire::messages::TrainConfig;
use flotilla_server::ServerConfig;

/// Creates a PKI in `dir`: CA, a server certificate for `localhost`/`127.0.0.1`, and client
/// certificates `client-000 … client-{n-1}`. Returns the ids.
pub fn make_pki(dir: &Path, clients: usize) -> anyhow::Result<(PkiDir, Vec<String>)> {
    let pki = PkiDir::new(dir);
    pki.init("Flotilla simulation CA")?;
    pki.issue_server(&["localhost".into(), "127.0.0.1".into()])?;
    let ids: Vec<String> = (0..clients).map(|i| format!("client-{i:03}")).collect();
    for id in &ids {
        pki.issue_client(id)?;
    }
    Ok((pki, ids))
}

/// A server configuration for loopback with the PKI's files.
pub fn server_config(pki: &PkiDir, checkpoint_dir: &Path) -> ServerConfig {
    let mut c = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        checkpoint_dir: checkpoint_dir.to_path_buf(),
        ..ServerConfig::default()
    };
    c.tls.ca = pki.ca_cert();
    c.tls.cert = pki.server_cert();
    c.tls.key = pki.server_key();
    c.tls.crl = Some(pki.crl());
    c
}

/// Client options for `id` against a server at `addr`, with quick retries suited to loopback.
pub fn client_options(pki: &PkiDir, id: &str, addr: SocketAddr) -> anyhow::Result<ClientOptions> {
    let identity = Identity::load(&pki.client_cert(id), &pki.client_key(id))
        .with_context(|| format!("loading {id}'s certificate"))?;
    let ca = load_certs(&pki.ca_cert())?;
    let mut o = ClientOptions::new(addr, "localhost", identity, ca);
    o.backoff_initial = std::time::Duration::from_millis(100);
    o.backoff_max = std::time::Duration::from_secs(2);
    Ok(o)
}

/// A counting semaphore for blocking code: at most `n` holders at once.
#[derive(Debug)]
pub struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Gate {
    /// A gate admitting `n` at once.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(n.max(1)),
            cv: Condvar::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            while *free == 0 {
                free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
            }
            *free -= 1;
        }
        let r = f();
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_one();
        r
    }
}

/// A trainer whose work goes through a [`Gate`], so that many simulated clients share the
/// machine's cores instead of thrashing them.
#[derive(Debug)]
pub struct Gated<T> {
    /// The trainer.
    pub inner: T,
    /// The shared gate.
    pub gate: Arc<Gate>,
}

impl<T: Trainer> Trainer for Gated<T> {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        self.gate.with(|| self.inner.initial_params())
    }
    fn train(
        &mut self,
        global: &Params,
        config: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        self.gate.with(|| self.inner.train(global, config))
    }
    fn evaluate(&mut self, global: &Params) -> Result<Evaluation, flotilla_client::Error> {
        self.gate.with(|| self.inner.evaluate(global))
    }
    fn stop_flag(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        self.inner.stop_flag()
    }
}
