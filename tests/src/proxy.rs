//! A TCP fault proxy, and the mesh of proxies that stands between the nodes of a test cluster.
//!
//! # Why a proxy
//!
//! A node's `--initial-cluster` may name a different address for a peer than the peer's own,
//! because the cluster identity depends on the member ids only. The harness gives node `i` the
//! address of a proxy `P(i→j)` for each peer `j`, and `P(i→j)` forwards to `j`'s real listen
//! address. Everything `i` sends to `j` (Raft RPCs on the HTTP/2 connection `i` opens to `j`,
//! and client writes `i` forwards to `j` as leader) crosses `P(i→j)`, and nothing else does: the
//! answers to `i`'s calls travel back on `i`'s own connection. So blocking `P(i→j)` is a one-way
//! cut (`i` cannot reach `j`, while `j` still reaches `i` over `P(j→i)`), and blocking both
//! directions is a full cut. Clients of the tests connect to the real addresses, so the test
//! itself can always observe every node.
//!
//! # Modes
//!
//! - [`Mode::Pass`] forwards bytes as they come.
//! - [`Mode::Block`] closes every connection open through the proxy, and holds new ones: they
//!   are accepted, but nothing is read from them and nothing is connected to the target until the
//!   proxy leaves `Block`. Then the held connection is connected and whatever the client wrote
//!   meanwhile flows, as after a real network heals. Closing the open connections makes the cut
//!   visible at once (rather than after TCP timeouts) and leaves no byte in flight across it.
//! - [`Mode::Delay`] adds a fixed latency to every chunk, in both directions, without limiting
//!   throughput (a reader queues each chunk with its due time; a writer sends it when due).
//!
//! Every switch into `Block` starts a new *epoch*; a connection opened in an earlier epoch is
//! closed as soon as it notices, and it checks before every write. So even a block that is lifted
//! at once separates the connections before it from the ones after it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// What a proxy does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Close open connections; accept new ones but carry nothing until unblocked.
    Block,
    /// Forward everything, each chunk this much later than it arrived.
    Delay(Duration),
}

/// The state every connection of one proxy watches.
#[derive(Clone, Copy, Debug)]
struct Shared {
    /// The current mode.
    mode: Mode,
    /// Where new connections go. Changed when the node behind the proxy restarts on a new port.
    target: SocketAddr,
    /// Bumped on every switch into `Block` and every change of target: a connection opened in an
    /// older epoch must close.
    epoch: u64,
}

/// How long a proxy waits to connect to its target before closing the client's connection (the
/// client then sees what it would see if the target were down).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Chunks queued per direction of a connection before the reader waits for the writer.
const QUEUE_CHUNKS: usize = 64;
/// Read buffer per direction.
const CHUNK_BYTES: usize = 16 * 1024;

/// One forwarding proxy on a free loopback port. Dropping it stops it and closes every
/// connection through it.
pub struct Proxy {
    /// The address clients connect to.
    listen: SocketAddr,
    /// Mode, target and epoch, watched by the accept loop and every connection.
    shared: watch::Sender<Shared>,
    /// The accept loop; it owns the connection tasks, so aborting it ends them all.
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `target`, in [`Mode::Pass`].
    /// It must be called inside a tokio runtime, which then runs the proxy.
    pub async fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let listen = listener.local_addr()?;
        let (shared, watcher) = watch::channel(Shared {
            mode: Mode::Pass,
            target,
            epoch: 0,
        });
        let accept = tokio::spawn(accept_loop(listener, watcher));
        Ok(Proxy {
            listen,
            shared,
            accept,
        })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The address it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.borrow().target
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.borrow().mode
    }

    /// Switches the mode. Takes effect at once for new connections; open connections notice
    /// within a scheduling round (and before their next write).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.send_modify(|s| {
            if mode == Mode::Block && s.mode != Mode::Block {
                s.epoch += 1;
            }
            s.mode = mode;
        });
    }

    /// Sends new connections to `target` from now on, and closes the open ones (which lead to
    /// the old target).
    pub fn set_target(&self, target: SocketAddr) {
        self.shared.send_modify(|s| {
            if s.target != target {
                s.target = target;
                s.epoch += 1;
            }
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Proxy({} → {}, {:?})",
            self.listen,
            self.target(),
            self.mode()
        )
    }
}

/// Accepts connections and serves each in a task of its own. The tasks live in a `JoinSet`
/// owned by this loop, so that aborting the loop (dropping the proxy) aborts them too.
async fn accept_loop(listener: TcpListener, shared: watch::Receiver<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    connections.spawn(serve(inbound, shared.clone()));
                }
                // Out of file descriptors or similar: back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a pump stopped early.
struct Cut;

/// Serves one accepted connection: holds it while blocked, then connects to the target and
/// pumps both directions until both end or the epoch changes.
async fn serve(inbound: TcpStream, mut shared: watch::Receiver<Shared>) {
    let (epoch, target) = {
        let Ok(state) = shared.wait_for(|s| s.mode != Mode::Block).await else {
            return; // the proxy is gone
        };
        (state.epoch, state.target)
    };
    let outbound = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        // The target is down: closing the client's connection is what it would see anyway.
        _ => return,
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (inbound_read, inbound_write) = inbound.into_split();
    let (outbound_read, outbound_write) = outbound.into_split();
    // The first direction to be cut ends both: `try_join` drops the other pump, and with it the
    // last halves of both sockets, which closes them.
    let _ = tokio::try_join!(
        pump(inbound_read, outbound_write, shared.clone(), epoch),
        pump(outbound_read, inbound_write, shared, epoch),
    );
}

/// Copies one direction of a connection, delaying each chunk as the mode says at the time it is
/// read, until end of stream (then half-closes the other side) or until the epoch changes.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: watch::Receiver<Shared>,
    epoch: u64,
) -> Result<(), Cut> {
    let (queue, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let reader_state = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = match reader_state.borrow().mode {
                Mode::Delay(d) => d,
                Mode::Pass | Mode::Block => Duration::ZERO,
            };
            if queue
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer_state = shared.clone();
    let writer = async move {
        while let Some((when, chunk)) = due.recv().await {
            tokio::time::sleep_until(when).await;
            if writer_state.borrow().epoch != epoch {
                return Err(Cut);
            }
            if to.write_all(&chunk).await.is_err() {
                return Err(Cut);
            }
        }
        // End of stream from the reader: pass the half-close on.
        let _ = to.shutdown().await;
        Ok(())
    };
    let mut cut_state = shared;
    let cut = async move {
        // An error means the proxy was dropped, which also ends the connection.
        let _ = cut_state.wait_for(|s| s.epoch != epoch).await;
    };
    tokio::select! {
        (_, written) = async { tokio::join!(reader, writer) } => written,
        () = cut => Err(Cut),
    }
}

/// The full mesh of proxies `P(i→j)` between the members of a test cluster, with helpers that
/// cut and heal links. Ids that are not in the mesh (nodes that joined later and are reached at
/// their real address) cannot be cut: the helpers panic on them, as on any other test bug.
pub struct Network {
    /// The members, ascending (kept apart from `links`: a one-node mesh has no links).
    ids: Vec<u64>,
    /// `P(from→to)` for every ordered pair of distinct members.
    links: BTreeMap<(u64, u64), Proxy>,
}

impl Network {
    /// Starts `P(i→j)` for every ordered pair of distinct ids of `targets`, each forwarding to
    /// `targets[j]`.
    pub async fn start(targets: &BTreeMap<u64, SocketAddr>) -> io::Result<Network> {
        let mut links = BTreeMap::new();
        for &from in targets.keys() {
            for (&to, &target) in targets {
                if from != to {
                    links.insert((from, to), Proxy::start(target).await?);
                }
            }
        }
        Ok(Network {
            ids: targets.keys().copied().collect(),
            links,
        })
    }

    /// The ids in the mesh, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.ids.clone()
    }

    /// Whether `id` is in the mesh.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// The proxy `P(from→to)`.
    pub fn link(&self, from: u64, to: u64) -> &Proxy {
        match self.links.get(&(from, to)) {
            Some(proxy) => proxy,
            None => panic!("no proxied link {from}→{to}: both must be founding members"),
        }
    }

    /// The address node `from` must use for peer `to`.
    pub fn address(&self, from: u64, to: u64) -> SocketAddr {
        self.link(from, to).addr()
    }

    /// Points every `P(*→to)` at `target` (after `to` restarted on another port).
    pub fn retarget(&self, to: u64, target: SocketAddr) {
        for (&(_, t), proxy) in &self.links {
            if t == to {
                proxy.set_target(target);
            }
        }
    }

    /// Sets the mode of `P(from→to)`.
    pub fn set_link(&self, from: u64, to: u64, mode: Mode) {
        self.link(from, to).set_mode(mode);
    }

    /// `from` can no longer reach `to`; `to` still reaches `from`.
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.set_link(from, to, Mode::Block);
    }

    /// No node of `a` reaches a node of `b`, nor the reverse. Links inside each group are
    /// unchanged.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                assert_ne!(x, y, "node {x} is on both sides of the partition");
                self.set_link(x, y, Mode::Block);
                self.set_link(y, x, Mode::Block);
            }
        }
    }

    /// Cuts `id` off from every other member, both ways.
    pub fn isolate(&self, id: u64) {
        let others: Vec<u64> = self.ids().into_iter().filter(|&x| x != id).collect();
        self.partition(&[id], &others);
    }

    /// Adds `delay` to every chunk on `P(from→to)`.
    pub fn delay(&self, from: u64, to: u64, delay: Duration) {
        self.set_link(from, to, Mode::Delay(delay));
    }

    /// Every link back to [`Mode::Pass`].
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.set_mode(Mode::Pass);
        }
    }

    /// The links that are not passing, e.g. `1→2 Block, 2→1 Block`; `all links pass` if none.
    pub fn describe(&self) -> String {
        let faults: Vec<String> = self
            .links
            .iter()
            .filter(|(_, p)| p.mode() != Mode::Pass)
            .map(|(&(from, to), p)| format!("{from}→{to} {:?}", p.mode()))
            .collect();
        if faults.is_empty() {
            "all links pass".to_string()
        } else {
            faults.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for something that should happen at once.
    const PROMPTLY: Duration = Duration::from_secs(2);
    /// How long a test waits to be sure that something does not happen.
    const QUIET: Duration = Duration::from_millis(300);

    /// A server that greets every connection with `tag` and then echoes what it reads.
    async fn echo_server(tag: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    if stream.write_all(tag).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Reads exactly `n` bytes, or fails if they do not come within `within`.
    async fn read_n(stream: &mut TcpStream, n: usize, within: Duration) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Ok(buf),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "nothing came")),
        }
    }

    /// Connects through `addr`, expects the greeting `tag`, and checks one echo.
    async fn round_trip(addr: SocketAddr, tag: &[u8]) -> io::Result<()> {
        let mut stream = TcpStream::connect(addr).await?;
        let greeting = read_n(&mut stream, tag.len(), PROMPTLY).await?;
        assert_eq!(greeting, tag);
        stream.write_all(b"ping").await?;
        assert_eq!(read_n(&mut stream, 4, PROMPTLY).await?, b"ping");
        Ok(())
    }

    /// Whether a connection through `addr` gets its greeting within [`QUIET`].
    async fn flows(addr: SocketAddr, tag: &[u8]) -> bool {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return false;
        };
        read_n(&mut stream, tag.len(), QUIET).await.is_ok()
    }

    #[tokio::test]
    async fn a_passing_proxy_forwards_both_ways() {
        let target = echo_server(b"A").await;
        let proxy = Proxy::start(target).await.unwrap();
        round_trip(proxy.addr(), b"A").await.unwrap();
        assert_eq!(proxy.mode(), Mode::Pass);
        assert_eq!(proxy.target(), target);
    }

    #[tokio::test]
    async fn a_block_closes_open_connections_and_holds_new_ones_until_healed() {
        let proxy = Proxy::start(echo_server(b"A").await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(read_n(&mut open, 1, PROMPTLY).await.unwrap(), b"A");

        proxy.set_mode(Mode::Block);
        // The open connection is closed: the read ends (EOF or reset) rather than hanging.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PROMPTLY, open.read_to_end(&mut rest)).await;
        assert!(
            ended.is_ok(),
            "the open connection was not closed by the block"
        );
        assert!(rest.is_empty(), "bytes crossed the block: {rest:?}");

        // A new connection is accepted but nothing flows while blocked.
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"ping").await.unwrap();
        assert!(
            read_n(&mut held, 1, QUIET).await.is_err(),
            "bytes crossed the block"
        );

        // Healing connects the held connection: its greeting and the echo of what was written
        // during the block arrive.
        proxy.set_mode(Mode::Pass);
        assert_eq!(read_n(&mut held, 5, PROMPTLY).await.unwrap(), b"Aping");
        round_trip(proxy.addr(), b"A").await.unwrap();
    }

    #[tokio::test]
    async fn a_block_lifted_at_once_still_closes_the_connections_before_it() {
        let proxy = Proxy::start(echo_server(b"A").await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(read_n(&mut open, 1, PROMPTLY).await.unwrap(), b"A");
        proxy.set_mode(Mode::Block);
        proxy.set_mode(Mode::Pass);
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PROMPTLY, open.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "a connection survived a block");
        round_trip(proxy.addr(), b"A").await.unwrap();
    }

    #[tokio::test]
    async fn a_delay_adds_latency_to_each_direction() {
        let proxy = Proxy::start(echo_server(b"A").await).await.unwrap();
        proxy.set_mode(Mode::Delay(Duration::from_millis(150)));
        let started = Instant::now();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(read_n(&mut stream, 1, PROMPTLY).await.unwrap(), b"A");
        let greeting = started.elapsed();
        assert!(
            greeting >= Duration::from_millis(150),
            "greeting after {greeting:?}"
        );
        let sent = Instant::now();
        stream.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut stream, 4, PROMPTLY).await.unwrap(), b"ping");
        let echo = sent.elapsed();
        assert!(
            echo >= Duration::from_millis(300),
            "echo after {echo:?}: two delayed legs"
        );
        // Back to pass: no added latency for new chunks.
        proxy.set_mode(Mode::Pass);
        let sent = Instant::now();
        stream.write_all(b"pong").await.unwrap();
        assert_eq!(read_n(&mut stream, 4, PROMPTLY).await.unwrap(), b"pong");
        assert!(sent.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_retargeted_proxy_sends_new_connections_to_the_new_target() {
        let proxy = Proxy::start(echo_server(b"A").await).await.unwrap();
        round_trip(proxy.addr(), b"A").await.unwrap();
        let b = echo_server(b"B").await;
        proxy.set_target(b);
        round_trip(proxy.addr(), b"B").await.unwrap();
    }

    #[tokio::test]
    async fn a_proxy_whose_target_is_down_closes_the_connection() {
        // A port that was free a moment ago: nothing listens there.
        let dead = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = Proxy::start(dead).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PROMPTLY, stream.read_to_end(&mut rest)).await;
        assert!(
            ended.is_ok(),
            "the connection to a dead target was left open"
        );
    }

    #[tokio::test]
    async fn a_dropped_proxy_closes_its_connections() {
        let proxy = Proxy::start(echo_server(b"A").await).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(read_n(&mut open, 1, PROMPTLY).await.unwrap(), b"A");
        drop(proxy);
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(PROMPTLY, open.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "a connection outlived its proxy");
    }

    /// A gRPC client keeps one HTTP/2 connection, as syncd's transport does: a block must fail
    /// its calls, and after the heal the same channel must work again (it reconnects; its old
    /// connection was closed by the block).
    #[tokio::test]
    async fn a_grpc_channel_through_a_proxy_fails_while_blocked_and_recovers_after_heal() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let (_reporter, service) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let proxy = Proxy::start(server_addr).await.unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr()))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        let check = || {
            let mut client = HealthClient::new(channel.clone());
            async move {
                let mut request = tonic::Request::new(HealthCheckRequest::default());
                request.set_timeout(Duration::from_millis(500));
                let answer = tokio::time::timeout(PROMPTLY, client.check(request)).await;
                match answer {
                    Ok(Ok(r)) => r.into_inner().status == ServingStatus::Serving as i32,
                    _ => false,
                }
            }
        };
        assert!(check().await, "no answer through a passing proxy");
        proxy.set_mode(Mode::Block);
        // The first call may fail at once on the closed connection; the next ones go to a new,
        // held connection and must time out.
        for attempt in 0..3 {
            assert!(!check().await, "call {attempt} crossed the block");
        }
        proxy.set_mode(Mode::Pass);
        let healed = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "the channel did not recover after the heal"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("recovered {:?} after the heal", healed.elapsed());
    }

    /// A mesh over three echo servers tagged by node id.
    async fn mesh() -> (Network, BTreeMap<u64, &'static [u8]>) {
        let tags: BTreeMap<u64, &'static [u8]> = [(1, &b"1"[..]), (2, b"2"), (3, b"3")].into();
        let mut targets = BTreeMap::new();
        for (&id, &tag) in &tags {
            targets.insert(id, echo_server(tag).await);
        }
        (Network::start(&targets).await.unwrap(), tags)
    }

    /// Which links carry bytes right now, as `(from, to)` pairs.
    async fn flowing(network: &Network, tags: &BTreeMap<u64, &'static [u8]>) -> Vec<(u64, u64)> {
        let mut pairs = Vec::new();
        for from in network.ids() {
            for to in network.ids() {
                if from != to && flows(network.address(from, to), tags[&to]).await {
                    pairs.push((from, to));
                }
            }
        }
        pairs
    }

    #[tokio::test]
    async fn a_mesh_has_one_link_per_ordered_pair_to_the_right_node() {
        let (network, tags) = mesh().await;
        assert_eq!(network.ids(), vec![1, 2, 3]);
        for from in network.ids() {
            for to in network.ids() {
                if from != to {
                    round_trip(network.address(from, to), tags[&to])
                        .await
                        .unwrap();
                }
            }
        }
        assert_eq!(network.describe(), "all links pass");
    }

    #[tokio::test]
    async fn a_mesh_of_one_has_no_links_but_knows_its_member() {
        let network = Network::start(&[(7, echo_server(b"7").await)].into())
            .await
            .unwrap();
        assert_eq!(network.ids(), vec![7]);
        assert!(network.contains(7) && !network.contains(1));
        network.isolate(7);
        assert_eq!(network.describe(), "all links pass");
    }

    #[tokio::test]
    async fn a_one_way_cut_blocks_only_its_direction_and_heal_restores_it() {
        let (network, tags) = mesh().await;
        network.cut_one_way(1, 2);
        assert_eq!(
            flowing(&network, &tags).await,
            vec![(1, 3), (2, 1), (2, 3), (3, 1), (3, 2)]
        );
        assert_eq!(network.describe(), "1→2 Block");
        network.heal();
        assert_eq!(flowing(&network, &tags).await.len(), 6);
    }

    #[tokio::test]
    async fn a_partition_cuts_both_directions_between_groups_only() {
        let (network, tags) = mesh().await;
        network.partition(&[1], &[2, 3]);
        assert_eq!(flowing(&network, &tags).await, vec![(2, 3), (3, 2)]);
        network.heal();
        network.isolate(3);
        assert_eq!(flowing(&network, &tags).await, vec![(1, 2), (2, 1)]);
        network.heal();
        assert_eq!(flowing(&network, &tags).await.len(), 6);
    }

    #[tokio::test]
    async fn retargeting_a_node_moves_every_link_to_it() {
        let (network, _) = mesh().await;
        let moved = echo_server(b"X").await;
        network.retarget(2, moved);
        round_trip(network.address(1, 2), b"X").await.unwrap();
        round_trip(network.address(3, 2), b"X").await.unwrap();
        round_trip(network.address(2, 1), b"1").await.unwrap();
    }
}
