use proptest::prelude::*;

use super::*;

#[test]
fn a_roster_reads() {
    let reply: Vec<String> = [
        "10000", "", "9000", "1500", "2", "a/1", "14000", "0,3", "intake", "b/2", "15000", "", "",
    ]
    .map(String::from)
    .to_vec();
    let roster = parse_roster(&reply, 5000).unwrap();
    assert_eq!(roster.named, None);
    assert_eq!(roster.epoch, "9000");
    assert_eq!(roster.settling, Duration::from_millis(1500));
    assert_eq!(roster.lost, vec![1]);
    let members = roster.members;
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].name(), "a");
    assert_eq!(members[0].seen, Duration::from_millis(1000));
    assert_eq!(members[0].partitions, BTreeSet::from([0, 3]));
    assert!(members[0].admits);
    assert_eq!(members[1].seen, Duration::ZERO);
    assert!(members[1].partitions.is_empty());
    // A member of an earlier version says nothing of itself.
    assert!(!members[1].admits);
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    assert!(parse_roster(&s(&["1", "", "", "0", "", "a"]), 5000).is_none());
    assert!(parse_roster(&s(&["1", "", "", "0", "", "a", "9", ""]), 5000).is_none());
    assert!(parse_roster(&s(&["1", "", "", "0", "0"]), 5000).is_none());
    assert!(parse_roster(&s(&["1", "", "", "0", ""]), 5000).is_some());
    assert!(parse_roster(&s(&["1", "", "", "x", ""]), 5000).is_none());
    assert!(parse_roster(&s(&["1", "", "", "0"]), 5000).is_none());
    assert!(parse_roster(&[], 5000).is_none());
    let taken = parse_roster(&s(&["1", "a/2", "5", "0", "", "a/2", "900", "", ""]), 5000).unwrap();
    assert_eq!(taken.named.as_deref(), Some("a/2"));
}

proptest! {
    #[test]
    fn any_reply_reads_or_is_refused_without_panicking(
        reply in proptest::collection::vec(".{0,12}", 0..10), ttl in any::<u64>(),
    ) {
        let _ = parse_roster(&reply, ttl);
    }
}
