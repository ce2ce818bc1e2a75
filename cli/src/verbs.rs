//! Client verbs: `plinth volume …`, `plinth snapshot …` and `plinth status`, over the CSI API (and
//! plinth's local API for what CSI has no call for: mount points, snapshot names).

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use plinth_controller::context::VolumeContext;
use plinth_controller::identity::{MANIFEST_FILESYSTEMS, MANIFEST_GROWABLE, MANIFEST_POOL, MANIFEST_STAGING_ROOT};
use plinth_controller::params::ClassParameters;
use plinth_engine::model::{FsType, Provisioning};
use plinth_engine::size::format_size;
use plinth_proto::csi_v1::{self as csi, volume_capability};
use plinth_proto::local::{ListMountsRequest, ListSnapshotsRequest, SnapshotInfo};
use serde_json::json;
use tonic::Status;

use crate::cli::{Output, SnapshotVerb, VolumeVerb};
use crate::client::{Clients, connect};

fn explain(what: &str, status: Status) -> anyhow::Error {
    anyhow!("{what}: {} ({:?})", status.message(), status.code())
}

fn capability(fs_type: Option<FsType>, read_only: bool) -> csi::VolumeCapability {
    use volume_capability::access_mode::Mode;
    let access_type = match fs_type {
        Some(fs) => volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: fs.as_str().to_owned(),
            ..Default::default()
        }),
        None => volume_capability::AccessType::Block(volume_capability::BlockVolume {}),
    };
    let mode = if read_only { Mode::SingleNodeReaderOnly } else { Mode::SingleNodeWriter };
    csi::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

async fn all_volumes(clients: &mut Clients) -> anyhow::Result<Vec<csi::Volume>> {
    let mut volumes = Vec::new();
    let mut token = String::new();
    loop {
        let page = clients
            .controller
            .list_volumes(csi::ListVolumesRequest { max_entries: 100, starting_token: token })
            .await
            .map_err(|s| explain("listing volumes", s))?
            .into_inner();
        volumes.extend(page.entries.into_iter().filter_map(|e| e.volume));
        if page.next_token.is_empty() {
            return Ok(volumes);
        }
        token = page.next_token;
    }
}

/// The volume context plinth handed out for this volume (name, filesystem, provisioning).
fn context_of(volume: &csi::Volume) -> Option<VolumeContext> {
    VolumeContext::from_map(&volume.volume_context).ok()
}

fn name_of(volume: &csi::Volume) -> String {
    context_of(volume).map(|c| c.name).unwrap_or_default()
}

/// The volume named `name`. Standalone plinth derives a volume's ID from its name, so one
/// ControllerGetVolume finds it; a full listing (10 pages and ~130 ms at 1000 volumes) is the
/// fallback for an ID made otherwise.
async fn find_by_name(clients: &mut Clients, name: &str) -> anyhow::Result<csi::Volume> {
    let derived = plinth_engine::VolumeId::for_name(name).to_string();
    let got = clients.controller.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: derived }).await;
    if let Some(volume) = got.ok().and_then(|r| r.into_inner().volume).filter(|v| name_of(v) == name) {
        return Ok(volume);
    }
    all_volumes(clients)
        .await?
        .into_iter()
        .find(|v| name_of(v) == name)
        .ok_or_else(|| anyhow!("no volume named {name:?}; see `plinth volume list`"))
}

async fn manifest(clients: &mut Clients) -> anyhow::Result<std::collections::HashMap<String, String>> {
    Ok(clients
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map_err(|s| explain("asking plinth who it is", s))?
        .into_inner()
        .manifest)
}

async fn staging_path(clients: &mut Clients, volume_id: &str) -> anyhow::Result<String> {
    let root = manifest(clients).await?.remove(MANIFEST_STAGING_ROOT).ok_or_else(|| {
        anyhow!("this plinth does not stage volumes for the CLI; mount/unmount need `plinth standalone`")
    })?;
    Ok(format!("{root}/{volume_id}"))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    Ok(std::env::current_dir().context("reading the current directory")?.join(path))
}

fn print_json(value: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
}

fn volume_json(volume: &csi::Volume, mounts: &[String]) -> serde_json::Value {
    let context = context_of(volume);
    json!({
        "name": name_of(volume),
        "id": volume.volume_id,
        "capacity_bytes": volume.capacity_bytes,
        "fs_type": context.as_ref().and_then(|c| c.fs_type).map(FsType::as_str),
        "block": context.as_ref().is_none_or(|c| c.fs_type.is_none()),
        "provisioning": context.as_ref().map(|c| c.provisioning.as_str()),
        "mounted_at": mounts,
    })
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub async fn volume(endpoint: &str, output: Output, verb: VolumeVerb) -> anyhow::Result<()> {
    let mut clients = connect(endpoint).await?;
    match verb {
        VolumeVerb::Create { name, size, fs, block, thick, from_snapshot, from_volume } => {
            let source = match (&from_snapshot, &from_volume) {
                (Some(snapshot), _) => {
                    let id = find_snapshot(&mut clients, snapshot).await?.snapshot_id;
                    Some(csi::VolumeContentSource {
                        r#type: Some(csi::volume_content_source::Type::Snapshot(
                            csi::volume_content_source::SnapshotSource { snapshot_id: id },
                        )),
                    })
                }
                (None, Some(volume)) => {
                    let id = find_by_name(&mut clients, volume).await?.volume_id;
                    Some(csi::VolumeContentSource {
                        r#type: Some(csi::volume_content_source::Type::Volume(
                            csi::volume_content_source::VolumeSource { volume_id: id },
                        )),
                    })
                }
                (None, None) => None,
            };
            // A copy keeps its source's layout: ask for a mount capability without a filesystem
            // (the source's), or a block one for a block source.
            let fs_type = match (&source, block) {
                (_, true) => None,
                (Some(_), false) => source_layout(&mut clients, &from_snapshot, &from_volume).await?,
                (None, false) => Some(FsType::parse(fs.as_deref().unwrap_or("ext4"))?),
            };
            let provisioning = if thick { Provisioning::Thick } else { Provisioning::Thin };
            let parameters = ClassParameters {
                fs_type: if source.is_some() { None } else { fs_type },
                provisioning,
                mkfs_options: None,
            }
            .to_map();
            let volume = clients
                .controller
                .create_volume(csi::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                    volume_capabilities: vec![capability(fs_type, false)],
                    parameters,
                    volume_content_source: source,
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("creating volume {name:?}"), s))?
                .into_inner()
                .volume
                .ok_or_else(|| anyhow!("plinth returned no volume"))?;
            let from = from_snapshot
                .map(|s| format!(", from snapshot {s}"))
                .or(from_volume.map(|v| format!(", from volume {v}")));
            match output {
                Output::Json => print_json(volume_json(&volume, &[])),
                Output::Table => println!(
                    "created {name} ({}, {}, {}{})",
                    volume.volume_id,
                    format_size(volume.capacity_bytes as u64),
                    context_of(&volume).and_then(|c| c.fs_type).map_or("block", FsType::as_str),
                    from.unwrap_or_default()
                ),
            }
        }
        VolumeVerb::Expand { name, size } => {
            let volume = find_by_name(&mut clients, &name).await?;
            let grown = clients
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("expanding {name}"), s))?
                .into_inner();
            // As a CO does: a staged volume's node grows its device and filesystem now.
            let staged = clients
                .local
                .list_mounts(ListMountsRequest {})
                .await
                .map(|r| r.into_inner().volumes)
                .unwrap_or_default()
                .into_iter()
                .find(|m| m.volume_id == volume.volume_id && !m.staging_path.is_empty());
            let mut capacity = grown.capacity_bytes;
            if let (Some(staged), true) = (staged, grown.node_expansion_required) {
                capacity = clients
                    .node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: volume.volume_id.clone(),
                        volume_path: staged.staging_path,
                        capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| explain(&format!("growing {name} on the node"), s))?
                    .into_inner()
                    .capacity_bytes;
            }
            match output {
                Output::Json => print_json(json!({"name": name, "id": volume.volume_id, "capacity_bytes": capacity})),
                Output::Table => println!("expanded {name} to {}", format_size(capacity.max(0) as u64)),
            }
        }
        VolumeVerb::List => {
            let volumes = all_volumes(&mut clients).await?;
            let mounts = local_mounts(&mut clients, &volumes).await;
            match output {
                Output::Json => {
                    print_json(json!(volumes.iter().zip(&mounts).map(|(v, m)| volume_json(v, m)).collect::<Vec<_>>()))
                }
                Output::Table => print_volumes(&volumes, &mounts),
            }
        }
        VolumeVerb::Mount { name, path, read_only } => {
            let volume = find_by_name(&mut clients, &name).await?;
            let staging = staging_path(&mut clients, &volume.volume_id).await?;
            let target = absolute(&path)?;
            let cap = capability(context_of(&volume).and_then(|c| c.fs_type), read_only);
            clients
                .node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(cap.clone()),
                    volume_context: volume.volume_context.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("staging {name}"), s))?;
            clients
                .node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    staging_target_path: staging,
                    target_path: target.display().to_string(),
                    volume_capability: Some(cap),
                    readonly: read_only,
                    volume_context: volume.volume_context.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("mounting {name} at {}", target.display()), s))?;
            match output {
                Output::Json => print_json(json!({"name": name, "id": volume.volume_id, "mounted_at": target})),
                Output::Table => println!("mounted {name} at {}", target.display()),
            }
        }
        VolumeVerb::Unmount { path } => {
            let target = absolute(&path)?.display().to_string();
            let mounts = clients
                .local
                .list_mounts(ListMountsRequest {})
                .await
                .map_err(|s| explain("asking plinth where its volumes are mounted", s))?
                .into_inner()
                .volumes;
            let owner_id = mounts.into_iter().find(|m| m.published_paths.contains(&target)).map(|m| m.volume_id);
            let owner = match owner_id {
                Some(id) => all_volumes(&mut clients).await?.into_iter().find(|v| v.volume_id == id),
                None => None,
            };
            let volume = owner.ok_or_else(|| anyhow!("no plinth volume is mounted at {target}"))?;
            clients
                .node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    target_path: target.clone(),
                })
                .await
                .map_err(|s| explain(&format!("unmounting {target}"), s))?;
            let staging = staging_path(&mut clients, &volume.volume_id).await?;
            let unstaged = clients
                .node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    staging_target_path: staging,
                })
                .await;
            let name = name_of(&volume);
            match unstaged {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    eprintln!("note: {name} stays staged: {}", s.message());
                }
                Err(s) => return Err(explain(&format!("unstaging {name}"), s)),
            }
            match output {
                Output::Json => print_json(json!({"name": name, "id": volume.volume_id, "unmounted": target})),
                Output::Table => println!("unmounted {name} from {target}"),
            }
        }
        VolumeVerb::Delete { name } => {
            let volume = find_by_name(&mut clients, &name).await?;
            clients
                .controller
                .delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() })
                .await
                .map_err(|s| explain(&format!("deleting {name} (unmount it first if it is mounted)"), s))?;
            match output {
                Output::Json => print_json(json!({"name": name, "id": volume.volume_id, "deleted": true})),
                Output::Table => println!("deleted {name}"),
            }
        }
    }
    Ok(())
}

/// Where each volume is mounted, as the node serving the socket knows it (empty lists when that
/// plinth has no node duty).
async fn local_mounts(clients: &mut Clients, volumes: &[csi::Volume]) -> Vec<Vec<String>> {
    let known = clients.local.list_mounts(ListMountsRequest {}).await.map(|r| r.into_inner().volumes);
    let known = known.unwrap_or_default();
    volumes
        .iter()
        .map(|volume| {
            known
                .iter()
                .find(|m| m.volume_id == volume.volume_id)
                .map(|m| m.published_paths.clone())
                .unwrap_or_default()
        })
        .collect()
}

fn print_volumes(volumes: &[csi::Volume], mounts: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .zip(mounts)
        .map(|(v, m)| {
            vec![
                name_of(v),
                v.volume_id.clone(),
                format_size(v.capacity_bytes as u64),
                context_of(v).and_then(|c| c.fs_type).map_or("block", FsType::as_str).to_owned(),
                context_of(v).map(|c| c.provisioning.as_str().to_owned()).unwrap_or_default(),
                if m.is_empty() { "-".into() } else { m.join(",") },
            ]
        })
        .collect();
    print_table(&["NAME", "ID", "SIZE", "TYPE", "PROVISIONING", "MOUNTED AT"], &rows);
}

pub async fn status(endpoint: &str, output: Output) -> anyhow::Result<()> {
    let mut clients = connect(endpoint).await?;
    let info = clients
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .map_err(|s| explain("asking plinth who it is", s))?
        .into_inner();
    let ready = clients.identity.probe(csi::ProbeRequest {}).await;
    let node = clients
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .unwrap_or_default();
    let capacity = clients
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .map_err(|s| explain("reading pool capacity", s))?
        .into_inner();
    let volumes = all_volumes(&mut clients).await?;
    let mounts = local_mounts(&mut clients, &volumes).await;
    let provisioned: i64 = volumes.iter().map(|v| v.capacity_bytes).sum();
    let pool = info.manifest.get(MANIFEST_POOL).cloned().unwrap_or_default();
    let listed = |key: &str| -> Vec<String> {
        info.manifest
            .get(key)
            .map(|v| v.split(',').filter(|f| !f.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (formattable, growable) = (listed(MANIFEST_FILESYSTEMS), listed(MANIFEST_GROWABLE));
    let filesystems_text = FsType::ALL
        .iter()
        .map(|fs| {
            let name = fs.as_str();
            match (formattable.iter().any(|f| f == name), growable.iter().any(|f| f == name)) {
                (true, true) => name.to_owned(),
                (true, false) => format!("{name} (cannot grow: tools missing)"),
                (false, _) => format!("{name} (not installed)"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let ready_text = match &ready {
        Ok(_) => "ready".to_owned(),
        Err(s) => format!("not ready: {}", s.message()),
    };
    match output {
        Output::Json => print_json(json!({
            "driver": info.name,
            "version": info.vendor_version,
            "node_id": node,
            "ready": ready.is_ok(),
            "pool": pool,
            "available_bytes": capacity.available_capacity,
            "provisioned_bytes": provisioned,
            "filesystems": {"format": formattable, "grow": growable},
            "volumes": volumes.iter().zip(&mounts).map(|(v, m)| volume_json(v, m)).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!("{} {} on node {node}: {ready_text}", info.name, info.vendor_version);
            println!(
                "pool {pool}: {} available, {} provisioned in {} volume(s)",
                format_size(capacity.available_capacity.max(0) as u64),
                format_size(provisioned.max(0) as u64),
                volumes.len()
            );
            if info.manifest.contains_key(MANIFEST_FILESYSTEMS) {
                println!("filesystems: {filesystems_text}");
            }
            if !volumes.is_empty() {
                println!();
                print_volumes(&volumes, &mounts);
            }
        }
    }
    if ready.is_err() {
        bail!("plinth is not ready");
    }
    Ok(())
}

/// The filesystem a copy will have: its source's (`None`: a block source).
async fn source_layout(
    clients: &mut Clients,
    from_snapshot: &Option<String>,
    from_volume: &Option<String>,
) -> anyhow::Result<Option<FsType>> {
    match (from_snapshot, from_volume) {
        (Some(snapshot), _) => {
            let fs = find_snapshot(clients, snapshot).await?.fs_type;
            Ok(if fs.is_empty() { None } else { Some(FsType::parse(&fs)?) })
        }
        (None, Some(volume)) => Ok(context_of(&find_by_name(clients, volume).await?).and_then(|c| c.fs_type)),
        (None, None) => Ok(None),
    }
}

async fn all_snapshots(clients: &mut Clients) -> anyhow::Result<Vec<SnapshotInfo>> {
    Ok(clients
        .local
        .list_snapshots(ListSnapshotsRequest {})
        .await
        .map_err(|s| explain("listing snapshots", s))?
        .into_inner()
        .snapshots)
}

async fn find_snapshot(clients: &mut Clients, name: &str) -> anyhow::Result<SnapshotInfo> {
    all_snapshots(clients)
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow!("no snapshot named {name:?}; see `plinth snapshot list`"))
}

fn snapshot_json(snapshot: &SnapshotInfo, volumes: &[csi::Volume]) -> serde_json::Value {
    json!({
        "name": snapshot.name,
        "id": snapshot.snapshot_id,
        "source_volume": volumes.iter().find(|v| v.volume_id == snapshot.source_volume_id).map(name_of),
        "source_volume_id": snapshot.source_volume_id,
        "size_bytes": snapshot.size_bytes,
        "created_at_seconds": snapshot.created_at_seconds,
        "copy_method": snapshot.copy_method,
    })
}

pub async fn snapshot(endpoint: &str, output: Output, verb: SnapshotVerb) -> anyhow::Result<()> {
    let mut clients = connect(endpoint).await?;
    match verb {
        SnapshotVerb::Create { name, volume } => {
            let source = find_by_name(&mut clients, &volume).await?;
            let started = std::time::Instant::now();
            clients
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: source.volume_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("snapshotting {volume}"), s))?;
            let elapsed = started.elapsed();
            let taken = find_snapshot(&mut clients, &name).await?;
            match output {
                Output::Json => {
                    let mut value = snapshot_json(&taken, std::slice::from_ref(&source));
                    value["seconds"] = json!(elapsed.as_secs_f64());
                    print_json(value)
                }
                Output::Table => println!(
                    "snapshot {name} of {volume} taken ({}, {}, {:.2?})",
                    taken.snapshot_id, taken.copy_method, elapsed
                ),
            }
        }
        SnapshotVerb::List => {
            let snapshots = all_snapshots(&mut clients).await?;
            let volumes = all_volumes(&mut clients).await?;
            match output {
                Output::Json => {
                    print_json(json!(snapshots.iter().map(|s| snapshot_json(s, &volumes)).collect::<Vec<_>>()))
                }
                Output::Table => {
                    let rows: Vec<Vec<String>> = snapshots
                        .iter()
                        .map(|s| {
                            let source = volumes.iter().find(|v| v.volume_id == s.source_volume_id).map(name_of);
                            vec![
                                s.name.clone(),
                                s.snapshot_id.clone(),
                                source.unwrap_or_else(|| format!("({})", s.source_volume_id)),
                                format_size(s.size_bytes.max(0) as u64),
                                s.copy_method.clone(),
                            ]
                        })
                        .collect();
                    print_table(&["NAME", "ID", "SOURCE", "SIZE", "METHOD"], &rows);
                }
            }
        }
        SnapshotVerb::Delete { name } => {
            let snapshot = find_snapshot(&mut clients, &name).await?;
            clients
                .controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: snapshot.snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| explain(&format!("deleting snapshot {name}"), s))?;
            match output {
                Output::Json => print_json(json!({"name": name, "id": snapshot.snapshot_id, "deleted": true})),
                Output::Table => println!("deleted snapshot {name}"),
            }
        }
    }
    Ok(())
}
