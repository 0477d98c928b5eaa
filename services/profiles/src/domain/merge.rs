//! PRF-3: which values a merged record keeps.

use crm_proto::profiles::v1::Customer;

/// Fields a merge may take from the loser (and `take_from_loser` may name).
pub const MERGEABLE: &[&str] = &[
    "name",
    "phone",
    "email",
    "birthday",
    "gender",
    "region",
    "timezone",
    "preferred_channel",
    "address",
    "organization",
];

/// The survivor after merging `loser` into it: the survivor's non-empty
/// values win unless the field is named in `take_from_loser`; empty survivor
/// fields are filled from the loser; tags are united; attribute keys the
/// survivor lacks are added. Returns the record and the fields that came
/// from the loser.
pub fn merged(survivor: &Customer, loser: &Customer, take_from_loser: &[String]) -> (Customer, Vec<String>) {
    let mut out = survivor.clone();
    let mut from_loser = Vec::new();
    macro_rules! field {
        ($name:ident, $empty:expr) => {{
            let forced = take_from_loser.iter().any(|p| p == stringify!($name));
            let survivor_empty = $empty(&survivor.$name);
            let loser_empty = $empty(&loser.$name);
            if !loser_empty && (forced || survivor_empty) && survivor.$name != loser.$name {
                out.$name = loser.$name.clone();
                from_loser.push(stringify!($name).to_string());
            }
        }};
    }
    field!(name, |s: &String| s.is_empty());
    field!(phone, |s: &String| s.is_empty());
    field!(email, |s: &String| s.is_empty());
    field!(birthday, |s: &Option<_>| s.is_none());
    field!(gender, |s: &i32| *s == 0);
    field!(region, |s: &String| s.is_empty());
    field!(timezone, |s: &String| s.is_empty());
    field!(preferred_channel, |s: &i32| *s == 0);
    field!(address, |s: &Option<_>| s.is_none());
    field!(organization, |s: &Option<_>| s.is_none());
    for t in &loser.tags {
        if !out.tags.contains(t) {
            out.tags.push(t.clone());
            if !from_loser.iter().any(|f| f == "tags") {
                from_loser.push("tags".into());
            }
        }
    }
    for (k, v) in &loser.attributes {
        if !out.attributes.contains_key(k) {
            out.attributes.insert(k.clone(), v.clone());
            if !from_loser.iter().any(|f| f == "attributes") {
                from_loser.push("attributes".into());
            }
        }
    }
    (out, from_loser)
}

/// PRF-3 undo: the survivor's record with every field that came from the
/// loser put back as it was before the merge, unless it changed since the
/// merge (a later edit wins). Tags and attribute keys added by the merge and
/// still present are removed.
pub fn unmerged(current: &Customer, before: &Customer, after_merge: &Customer, from_loser: &[String]) -> Customer {
    let mut out = current.clone();
    macro_rules! restore {
        ($name:ident) => {
            if from_loser.iter().any(|f| f == stringify!($name)) && current.$name == after_merge.$name {
                out.$name = before.$name.clone();
            }
        };
    }
    restore!(name);
    restore!(phone);
    restore!(email);
    restore!(birthday);
    restore!(gender);
    restore!(region);
    restore!(timezone);
    restore!(preferred_channel);
    restore!(address);
    restore!(organization);
    if from_loser.iter().any(|f| f == "tags") {
        let added: Vec<&String> = after_merge.tags.iter().filter(|t| !before.tags.contains(t)).collect();
        out.tags.retain(|t| !added.contains(&t));
    }
    if from_loser.iter().any(|f| f == "attributes") {
        for k in after_merge.attributes.keys().filter(|k| !before.attributes.contains_key(*k)) {
            if current.attributes.get(k) == after_merge.attributes.get(k) {
                out.attributes.remove(k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, phone: &str, email: &str, tags: &[&str]) -> Customer {
        Customer {
            name: name.into(),
            phone: phone.into(),
            email: email.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn survivor_values_win_and_gaps_are_filled_from_the_loser() {
        let s = c("Wei Li", "+8613800000001", "", &["vip"]);
        let l = c("W. Li", "+8613800000002", "wei@example.com", &["newsletter"]);
        let (m, from) = merged(&s, &l, &[]);
        assert_eq!(
            (m.name.as_str(), m.phone.as_str(), m.email.as_str()),
            ("Wei Li", "+8613800000001", "wei@example.com")
        );
        assert_eq!(m.tags, ["vip", "newsletter"]);
        assert_eq!(from, ["email", "tags"]);
    }

    #[test]
    fn take_from_loser_overrides_the_survivor() {
        let s = c("Wei Li", "+8613800000001", "", &[]);
        let l = c("W. Li", "+8613800000002", "", &[]);
        let (m, from) = merged(&s, &l, &["phone".into()]);
        assert_eq!(m.phone, "+8613800000002");
        assert_eq!(from, ["phone"]);
    }

    #[test]
    fn undo_restores_what_came_from_the_loser_unless_edited_since() {
        let before = c("Wei Li", "+8613800000001", "", &["vip"]);
        let l = c("W. Li", "", "wei@example.com", &["newsletter"]);
        let (after, from) = merged(&before, &l, &[]);
        let restored = unmerged(&after, &before, &after, &from);
        assert_eq!(restored.email, "");
        assert_eq!(restored.tags, ["vip"]);
        let mut edited = after.clone();
        edited.email = "new@example.com".into();
        assert_eq!(unmerged(&edited, &before, &after, &from).email, "new@example.com", "a later edit wins");
    }
}
