//! Which filesystems this node can format and grow, from the programs installed on it: a node
//! without xfsprogs says so up front (status, manifest, metrics) and refuses xfs work with
//! FAILED_PRECONDITION naming the package, instead of failing halfway through a stage.

use crate::Engine;
use crate::error::{Error, Result};
use crate::model::FsType;
use crate::sys::mkfs::{PROBE_TOOL, tools};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSupport {
    pub fs: FsType,
    /// blkid and mkfs are installed.
    pub format: bool,
    /// The growth tools are installed.
    pub grow: bool,
}

impl Engine {
    pub fn filesystem_support(&self) -> Vec<FsSupport> {
        let probe = self.host.program_available(PROBE_TOOL.0);
        FsType::ALL
            .into_iter()
            .map(|fs| {
                let tools = tools(fs);
                FsSupport {
                    fs,
                    format: probe && self.host.program_available(tools.format),
                    grow: tools.grow.iter().all(|p| self.host.program_available(p)),
                }
            })
            .collect()
    }

    /// FAILED_PRECONDITION, naming what to install, unless this node can `format` and/or `grow` `fs`.
    pub(crate) fn require_tools(&self, fs: FsType, format: bool, grow: bool) -> Result<()> {
        let tools = tools(fs);
        let mut needed: Vec<(&str, &str)> = Vec::new();
        if format {
            needed.push(PROBE_TOOL);
            needed.push((tools.format, tools.package));
        }
        if grow {
            needed.extend(tools.grow.iter().map(|p| (*p, tools.package)));
        }
        let missing: Vec<(&str, &str)> = needed.into_iter().filter(|(p, _)| !self.host.program_available(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let programs: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        let mut packages: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
        packages.dedup();
        Err(Error::FailedPrecondition(format!(
            "node {} cannot {} {} volumes: {} not installed (install the {} package{} on the node)",
            self.node_id,
            if format { "format" } else { "grow" },
            fs.as_str(),
            programs.join(", ") + if programs.len() == 1 { " is" } else { " are" },
            packages.join(" and "),
            if packages.len() == 1 { "" } else { "s" },
        )))
    }
}
