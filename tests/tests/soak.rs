//! A bounded concurrency soak: several clients run random operations on a few volumes (some
//! shared, so operations collide) while plinth is killed with SIGKILL at random moments and
//! started again; afterwards, and after a simulated reboot, the invariants hold: nothing
//! half-made, loop devices and mounts exactly as the records say, images exactly the records'
//! volumes, and every acknowledged write still on its volume. The random sequence is seeded
//! (PLINTH_SOAK_SEED) so a failure can be replayed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use plinth_proto::csi_v1 as csi;
use plinth_proto::csi_v1::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
};
use plinth_tests::*;
use tonic::transport::{Endpoint, Uri};

const VOLUMES: [&str; 4] = ["a", "b", "c", "shared"];
const CLIENTS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(40);

/// xorshift64*: deterministic per seed, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn volume_id(name: &str) -> String {
    plinth_engine::VolumeId::for_name(name).to_string()
}

struct World {
    sandbox: Sandbox,
    /// The current plinth; the killer replaces it whatever calls are in flight.
    plinth: Mutex<Option<Plinth>>,
    /// The last acknowledged content of each volume's payload file (write + fsync returned).
    written: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl World {
    fn staging(&self, name: &str) -> PathBuf {
        self.sandbox.root().join(format!("staging-{name}"))
    }
    fn target(&self, name: &str) -> PathBuf {
        self.sandbox.root().join(format!("target-{name}"))
    }
}

/// One random operation by one client; errors are expected (crashes, collisions, wrong state).
async fn random_op(world: &World, rng: &mut Rng, client: usize, round: u64) {
    let name = VOLUMES[rng.below(VOLUMES.len() as u64) as usize];
    let id = volume_id(name);
    let (staging, target) = (world.staging(name), world.target(name));
    let Some(mut c) = try_connect(&world.sandbox.socket()).await else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return;
    };
    let _ = match rng.below(7) {
        0 => c.controller.create_volume(create_request(name, 32 * MIB, mount_cap("ext4"))).await.map(drop),
        1 => {
            let staged = c.node.node_stage_volume(stage_request(&id, &staging, mount_cap("ext4"))).await;
            let published = match staged {
                Ok(_) => c
                    .node
                    .node_publish_volume(publish_request(&id, &staging, &target, mount_cap("ext4")))
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            if published.is_ok() {
                // Written through the kernel, not through plinth: a plinth crash cannot lose it.
                // The record is held across the write, so the write recorded last is the one
                // that reached the file last (two clients may write the same volume).
                let content = format!("client {client} round {round}\n").into_bytes();
                let path = target.join("payload");
                let mut record = world.written.lock().unwrap();
                let written = std::fs::File::create(&path).and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(&content)?;
                    f.sync_all()
                });
                if written.is_ok() {
                    record.insert(name.to_owned(), content);
                }
            }
            published
        }
        2 => {
            let request =
                csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: target.display().to_string() };
            c.node.node_unpublish_volume(request).await.map(drop)
        }
        3 => {
            let request = csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
            };
            c.node.node_unstage_volume(request).await.map(drop)
        }
        4 => {
            let snapshot = format!("snap-{name}-{}", rng.below(2));
            let request =
                csi::CreateSnapshotRequest { name: snapshot, source_volume_id: id.clone(), ..Default::default() };
            c.controller.create_snapshot(request).await.map(drop)
        }
        5 => {
            let request = csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: (32 + 8 * rng.below(4) as i64) * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            c.controller.controller_expand_volume(request).await.map(drop)
        }
        _ => {
            let deleted = c
                .controller
                .delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
                .await;
            if deleted.is_ok() {
                world.written.lock().unwrap().remove(name);
            }
            deleted.map(drop)
        }
    };
}

/// Clients, or `None` while plinth is down (between a kill and the restart).
async fn try_connect(socket: &Path) -> Option<Clients> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://plinth.invalid")
        .ok()?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .ok()?;
    Some(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

/// Nothing half-made, and devices, mounts and images exactly as the records say.
fn check_invariants(sandbox: &Sandbox) -> Result<(), String> {
    let data = sandbox.data_dir();
    let mut staged = 0usize;
    let mut expected_mounts = Vec::new();
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(data.join("volumes")).map_err(|e| e.to_string())?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            return Err(format!("temp record {name}"));
        }
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).map_err(|e| e.to_string())?;
        if record.get("phase").is_some() {
            return Err(format!("{name} is an unfinished intent"));
        }
        ids.push(record["id"].as_str().unwrap().to_owned());
        if let Some(stage) = record["staged"].as_object() {
            staged += 1;
            expected_mounts.push(PathBuf::from(stage["staging_path"].as_str().unwrap()));
        }
        for target in record["published"].as_object().into_iter().flatten().map(|(k, _)| k) {
            expected_mounts.push(PathBuf::from(target));
        }
    }
    let mut images: Vec<String> = std::fs::read_dir(data.join("pool"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(partial) = images.iter().find(|i| !i.ends_with(".img")) {
        return Err(format!("half-made image {partial}"));
    }
    images.sort();
    ids.sort();
    let from_records: Vec<String> = ids.iter().map(|id| format!("{id}.img")).collect();
    if images != from_records {
        return Err(format!("images {images:?} but records {from_records:?}"));
    }
    let (devices, mut mounts) = (loop_devices_under(sandbox.path()), mounts_under(sandbox.path()));
    mounts.sort();
    expected_mounts.sort();
    if devices.len() != staged || mounts != expected_mounts {
        return Err(format!(
            "{} devices for {staged} staged; mounts {mounts:?} vs records {expected_mounts:?}",
            devices.len()
        ));
    }
    Ok(())
}

/// Every volume that holds an acknowledged write still holds it (staged and published again if
/// needed, through plinth).
async fn acknowledged_writes_survive(world: &World, clients: &mut Clients) {
    let written = world.written.lock().unwrap().clone();
    for (name, content) in written {
        let (id, staging, target) = (volume_id(&name), world.staging(&name), world.target(&name));
        clients.node.node_stage_volume(stage_request(&id, &staging, mount_cap("ext4"))).await.expect("restage");
        clients
            .node
            .node_publish_volume(publish_request(&id, &staging, &target, mount_cap("ext4")))
            .await
            .expect("republish");
        assert_eq!(std::fs::read(target.join("payload")).unwrap(), content, "{name}: the last acknowledged write");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn random_operations_under_random_kills_keep_every_invariant() {
    require_root!();
    let seed = std::env::var("PLINTH_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64 ^ std::process::id() as u64);
    eprintln!("soak seed {seed} (PLINTH_SOAK_SEED to replay)");
    let sandbox = Sandbox::new();
    let first = Plinth::start(&sandbox, &[]);
    let world = Arc::new(World { sandbox, plinth: Mutex::new(Some(first)), written: Mutex::new(BTreeMap::new()) });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let world = Arc::clone(&world);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(client as u64 * 0x9e37_79b9).max(1));
            let mut round = 0;
            while started.elapsed() < RUN_FOR {
                round += 1;
                random_op(&world, &mut rng, client, round).await;
            }
            round
        }));
    }
    let mut killer = Rng(seed.max(1));
    let mut kills = 0;
    while started.elapsed() < RUN_FOR {
        tokio::time::sleep(Duration::from_millis(700 + killer.below(1800))).await;
        // In the middle of whatever the clients are doing.
        let old = world.plinth.lock().unwrap().take();
        if let Some(plinth) = old {
            plinth.kill();
            kills += 1;
        }
        if killer.below(4) == 0 {
            // Sometimes a reboot too: every mount and loop device of the sandbox gone.
            sweep(world.sandbox.path());
        }
        let restarted = Plinth::start(&world.sandbox, &[]);
        *world.plinth.lock().unwrap() = Some(restarted);
    }
    let mut operations = 0;
    for task in tasks {
        operations += task.await.unwrap();
    }
    eprintln!("{operations} operations, {kills} kills in {:.0?}", started.elapsed());
    assert!(kills >= 10 && operations >= 100, "the soak did too little to prove anything");

    // A clean restart: the records and the machine agree.
    let last = world.plinth.lock().unwrap().take().unwrap();
    assert!(last.stop().success());
    let plinth = Plinth::start(&world.sandbox, &[]);
    check_invariants(&world.sandbox).unwrap_or_else(|e| panic!("after the soak: {e}"));
    let mut clients = plinth.clients().await;
    acknowledged_writes_survive(&world, &mut clients).await;
    check_invariants(&world.sandbox).unwrap_or_else(|e| panic!("after republishing: {e}"));
    drop(clients);
    assert!(plinth.stop().success());
}
