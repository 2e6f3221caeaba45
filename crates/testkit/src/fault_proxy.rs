//! A TCP proxy that can cut, stall or slow the connection to one dependency,
//! for fault tests and the chaos run: NATS, Redis, etcd, SQL or a gateway is
//! reached through it instead of directly.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Pass,
    /// Close every connection and refuse new ones: the dependency is down.
    Cut,
    /// Keep connections open but forward nothing: the dependency hangs.
    Blackhole,
    /// Forward everything this much later: the dependency is slow.
    Delay(Duration),
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, watcher) = watch::channel(ProxyMode::Pass);
        let stop = CancellationToken::new();
        let accepting = stop.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = accepting.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                if *watcher.borrow() == ProxyMode::Cut {
                    continue;
                }
                tokio::spawn(relay(client, target, watcher.clone(), accepting.clone()));
            }
        });
        Ok(Self { addr, mode, stop })
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let done = CancellationToken::new();
    let up = tokio::spawn(pump(cr, sw, mode.clone(), done.clone()));
    let down = tokio::spawn(pump(sr, cw, mode, done.clone()));
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = done.cancelled() => {}
    }
    done.cancel();
    let _ = up.await;
    let _ = down.await;
}

/// Copies one direction according to the mode; a cut closes the connection
/// at once, even if it is idle.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    done: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = done.cancelled() => return,
            changed = mode.wait_for(|m| *m == ProxyMode::Cut) => {
                let _ = changed;
                done.cancel();
                return;
            }
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    done.cancel();
                    return;
                }
                Ok(n) => n,
            },
        };
        let current = *mode.borrow();
        match current {
            ProxyMode::Pass => {}
            ProxyMode::Delay(d) => tokio::time::sleep(d).await,
            ProxyMode::Blackhole => continue,
            ProxyMode::Cut => {
                done.cancel();
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            done.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn passes_blackholes_and_cuts() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut s).await.unwrap(), b"ping");
        proxy.set(ProxyMode::Blackhole);
        assert!(
            roundtrip(&mut s).await.is_err(),
            "nothing comes back through a blackhole"
        );
        proxy.set(ProxyMode::Cut);
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "a cut closes open connections"
        );
        proxy.set(ProxyMode::Pass);
        let mut again = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut again).await.unwrap(), b"ping");
    }
}
