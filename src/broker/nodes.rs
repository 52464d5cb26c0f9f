//! Which node of a broker cluster the next connection goes to.
//!
//! The connection stays on one node while that node works, so every connection of a process
//! shares it; when a connection attempt to it fails, or a connection made to it ends in an
//! error (the node stopped, or stopped answering heartbeats), the next attempt goes to the
//! next node of the list, round the list. The first node is random, so replicas spread over
//! the cluster.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use lapin::ConnectionStatus;

/// The node choice over a list of `len` nodes: stays on the current node until it fails.
#[derive(Debug, Clone)]
pub struct Rotation {
    len: usize,
    current: usize,
}

impl Rotation {
    /// A choice over `len` nodes (at least one) that starts at `start` (taken modulo `len`).
    pub fn new(len: usize, start: usize) -> Self {
        let len = len.max(1);
        Self {
            len,
            current: start % len,
        }
    }

    /// The node the next connection goes to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Node `node` failed: if it is the current one, the next node becomes current. A
    /// failure of a node already left behind (a second connection to it ending) moves
    /// nothing, so one node's failure skips one node, however many connections it had.
    pub fn failed(&mut self, node: usize) {
        if node == self.current {
            self.current = (self.current + 1) % self.len;
        }
    }
}

/// One cluster's choice, and the connections made to its nodes that are still open, so that
/// one of them ending in an error counts as its node's failure.
#[derive(Debug)]
pub(super) struct Cluster {
    rotation: Rotation,
    open: Vec<(usize, ConnectionStatus)>,
}

impl Cluster {
    /// The node to try next, after counting the errors of the connections made before.
    pub(super) fn choose(&mut self) -> usize {
        let rotation = &mut self.rotation;
        self.open.retain(|(node, status)| {
            if status.errored() {
                rotation.failed(*node);
                false
            } else {
                // Closed by this process: its node is not to blame.
                !status.closed()
            }
        });
        self.rotation.current()
    }

    /// A connection to `node` was made; watch how it ends.
    pub(super) fn opened(&mut self, node: usize, status: ConnectionStatus) {
        self.open.push((node, status));
    }

    /// A connection attempt to `node` failed.
    pub(super) fn failed(&mut self, node: usize) {
        self.rotation.failed(node);
    }
}

/// One cluster's shared choice.
pub(super) type SharedCluster = Arc<Mutex<Cluster>>;

/// The node choice of every cluster this process connects to, by its list of URLs (a process
/// may talk to several: tests do).
static CLUSTERS: LazyLock<Mutex<HashMap<Vec<String>, SharedCluster>>> =
    LazyLock::new(Mutex::default);

/// The shared choice for this list of nodes, made on first use with a random first node.
pub(super) fn cluster(urls: &[String]) -> SharedCluster {
    let mut clusters = CLUSTERS.lock().unwrap_or_else(PoisonError::into_inner);
    clusters
        .entry(urls.to_vec())
        .or_insert_with(|| {
            Arc::new(Mutex::new(Cluster {
                rotation: Rotation::new(urls.len(), fastrand::usize(..urls.len().max(1))),
                open: Vec::new(),
            }))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::Rotation;

    proptest! {
        #[test]
        fn the_current_node_is_always_one_of_the_list(len in 0usize..64, start: usize, fails in proptest::collection::vec(any::<usize>(), 0..32)) {
            let mut r = Rotation::new(len, start);
            prop_assert!(r.current() < len.max(1));
            for f in fails {
                r.failed(f % len.max(1));
                prop_assert!(r.current() < len.max(1));
            }
        }

        #[test]
        fn failures_of_the_current_node_visit_every_node_once_per_round(len in 1usize..64, start: usize) {
            let mut r = Rotation::new(len, start);
            let first = r.current();
            let mut seen = vec![false; len];
            for _ in 0..len {
                let node = r.current();
                prop_assert!(!seen[node], "node {} chosen twice in one round", node);
                seen[node] = true;
                r.failed(node);
                if len > 1 {
                    prop_assert_ne!(r.current(), node, "a failed node is not tried again next");
                }
            }
            prop_assert!(seen.iter().all(|s| *s));
            prop_assert_eq!(r.current(), first);
        }

        #[test]
        fn a_node_left_behind_failing_again_moves_nothing(len in 2usize..64, start: usize, other in any::<usize>()) {
            let mut r = Rotation::new(len, start);
            let current = r.current();
            let other = (current + 1 + other % (len - 1)) % len;
            r.failed(other);
            prop_assert_eq!(r.current(), current);
        }
    }

    #[test]
    fn one_node_is_always_that_node() {
        let mut r = Rotation::new(1, 7);
        assert_eq!(r.current(), 0);
        r.failed(0);
        assert_eq!(r.current(), 0);
    }

    #[test]
    fn first_nodes_are_random() {
        // 60 clusters of 3 nodes: the chance that one node is never first is 3·(2/3)^60.
        let firsts: std::collections::HashSet<usize> = (0..60)
            .map(|i| {
                let urls: Vec<String> = (1..=3)
                    .map(|n| format!("amqp://first-node-test-{i}-{n}:5672/%2f"))
                    .collect();
                super::cluster(&urls).lock().unwrap().choose()
            })
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }
}
