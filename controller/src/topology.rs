//! Topology: a plinth volume lives on exactly one node, named by `topology.plinth.csi.dev/node`.

use std::collections::HashMap;

use plinth_proto::TOPOLOGY_NODE_KEY;
use plinth_proto::csi_v1 as csi;

/// The segment a volume (or node) on `node_id` is accessible from.
pub fn node_topology(node_id: &str) -> csi::Topology {
    csi::Topology { segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node_id.to_owned())]) }
}

/// The node a topology segment names, if it names one.
pub fn node_of(topology: &csi::Topology) -> Option<&str> {
    topology.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str)
}

/// Nodes named by a topology list, or `None` when the list says nothing (an empty list).
pub fn named_nodes(topologies: &[csi::Topology]) -> Option<Vec<String>> {
    let nodes: Vec<String> = topologies.iter().filter_map(node_of).map(str::to_owned).collect();
    (!topologies.is_empty()).then_some(nodes)
}

/// The node a CreateVolume should land on in cluster mode: the first preferred segment naming a
/// node (external-provisioner puts the scheduler's choice first), else the first requisite one.
pub fn requested_node(requirement: Option<&csi::TopologyRequirement>) -> Option<String> {
    let requirement = requirement?;
    requirement.preferred.iter().chain(&requirement.requisite).find_map(node_of).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_preferred_node_first() {
        let requirement = csi::TopologyRequirement {
            requisite: vec![node_topology("b"), node_topology("a")],
            preferred: vec![
                csi::Topology { segments: HashMap::from([("zone".into(), "z1".into())]) },
                node_topology("a"),
            ],
        };
        assert_eq!(requested_node(Some(&requirement)).as_deref(), Some("a"));
        let requisite_only = csi::TopologyRequirement { requisite: vec![node_topology("b")], preferred: vec![] };
        assert_eq!(requested_node(Some(&requisite_only)).as_deref(), Some("b"));
        assert_eq!(requested_node(Some(&csi::TopologyRequirement::default())), None);
        assert_eq!(requested_node(None), None);
    }

    #[test]
    fn named_nodes_distinguishes_no_requirement_from_no_node() {
        assert_eq!(named_nodes(&[]), None);
        let zone = csi::Topology { segments: HashMap::from([("zone".into(), "z1".into())]) };
        assert_eq!(named_nodes(&[zone]), Some(vec![]));
        assert_eq!(named_nodes(&[node_topology("a")]), Some(vec!["a".to_owned()]));
    }
}
