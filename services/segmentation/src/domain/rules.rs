//! SEG-6: segment rule trees, validated with field-level errors and compiled
//! to a parameterised SQL predicate (SEC-3). Field names map to columns
//! through a fixed table; every value the client gave becomes a bind
//! parameter, never SQL text.
//!
//! The predicate refers to `c` (segmentation's `customers`) and `s`
//! (`customer_scores`). Each leaf is wrapped in `COALESCE(..., false)`, so a
//! customer without a score never matches by accident and `not` means what a
//! person expects.

use crm_kit::FieldViolations;
use crm_proto::common::v1::{ChurnRiskLevel, LifecycleStage, Tier};
use crm_proto::segmentation::v1::{Condition, GridCell, Operator, RfmSegment, RuleNode, rule_node};

/// Largest number of nodes in a tree.
pub const MAX_NODES: usize = 200;
/// Deepest nesting.
pub const MAX_DEPTH: usize = 10;
/// Most children of one and/or node.
pub const MAX_CHILDREN: usize = 50;

/// A bind parameter of a compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// A whole number.
    Int(i64),
    /// A list of small whole numbers (enum values).
    Ints(Vec<i16>),
    /// Text.
    Text(String),
    /// A list of texts.
    Texts(Vec<String>),
    /// A decimal number (attribute comparisons).
    Number(f64),
}

/// A rule ready to run: `predicate` uses `$first..` placeholders for `params`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    /// SQL boolean expression over `c` and `s`.
    pub predicate: String,
    /// The values, in placeholder order.
    pub params: Vec<Param>,
}

#[derive(Clone, Copy)]
enum Kind {
    /// An enum column; values by name.
    Enum(fn(&str) -> Option<i32>),
    /// A whole-number column within a range.
    Int(i64, i64),
    /// The tags array.
    Tags,
    /// A text column.
    Text,
}

/// Rule fields and the columns they read.
const FIELDS: &[(&str, &str, Kind)] = &[
    ("tier", "s.tier", Kind::Enum(|v| Tier::from_str_name(v).map(|t| t as i32))),
    ("rfm.recency_score", "s.r_score", Kind::Int(1, 5)),
    ("rfm.frequency_score", "s.f_score", Kind::Int(1, 5)),
    ("rfm.monetary_score", "s.m_score", Kind::Int(1, 5)),
    ("rfm.segment", "s.rfm_segment", Kind::Enum(|v| RfmSegment::from_str_name(v).map(|t| t as i32))),
    ("lifecycle_stage", "s.lifecycle_stage", Kind::Enum(|v| LifecycleStage::from_str_name(v).map(|t| t as i32))),
    ("churn_level", "s.churn_level", Kind::Enum(|v| ChurnRiskLevel::from_str_name(v).map(|t| t as i32))),
    ("churn_score", "s.churn_score", Kind::Int(0, 100)),
    ("grid_cell", "s.grid_cell", Kind::Enum(|v| GridCell::from_str_name(v).map(|t| t as i32))),
    ("days_since_last_purchase", "s.recency_days", Kind::Int(-1, 100_000)),
    ("spend_12m_minor", "s.monetary_minor", Kind::Int(i64::MIN, i64::MAX)),
    ("purchases_12m", "s.frequency", Kind::Int(0, i64::MAX)),
    ("tags", "c.tags", Kind::Tags),
    ("region", "c.region", Kind::Text),
];

fn comparison(op: Operator) -> Option<&'static str> {
    Some(match op {
        Operator::Eq => "=",
        Operator::Ne => "<>",
        Operator::Lt => "<",
        Operator::Le => "<=",
        Operator::Gt => ">",
        Operator::Ge => ">=",
        _ => return None,
    })
}

struct Compiler {
    params: Vec<Param>,
    first: usize,
    nodes: usize,
    violations: FieldViolations,
}

impl Compiler {
    fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("${}", self.first + self.params.len() - 1)
    }

    fn node(&mut self, n: &RuleNode, path: &str, depth: usize) -> String {
        self.nodes += 1;
        if self.nodes == MAX_NODES + 1 {
            self.violations.add("rule", format!("has more than {MAX_NODES} nodes"));
        }
        if depth > MAX_DEPTH {
            self.violations.add(path, format!("nests deeper than {MAX_DEPTH} levels"));
            return "false".into();
        }
        match &n.node {
            None => {
                self.violations.add(path, "is empty: set condition, all, any or not");
                "false".into()
            }
            Some(rule_node::Node::Condition(c)) => self.condition(c, &format!("{path}.condition")),
            Some(rule_node::Node::All(list)) | Some(rule_node::Node::Any(list)) => {
                let (word, name) =
                    if matches!(n.node, Some(rule_node::Node::All(_))) { (" AND ", "all") } else { (" OR ", "any") };
                if list.nodes.is_empty() || list.nodes.len() > MAX_CHILDREN {
                    self.violations.add(format!("{path}.{name}.nodes"), format!("needs 1..{MAX_CHILDREN} children"));
                    return "false".into();
                }
                let parts: Vec<String> = list
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, child)| self.node(child, &format!("{path}.{name}.nodes[{i}]"), depth + 1))
                    .collect();
                format!("({})", parts.join(word))
            }
            Some(rule_node::Node::Not(inner)) => {
                format!("(NOT {})", self.node(inner, &format!("{path}.not"), depth + 1))
            }
        }
    }

    fn condition(&mut self, c: &Condition, path: &str) -> String {
        let op = Operator::try_from(c.op).unwrap_or(Operator::Unspecified);
        if op == Operator::Unspecified {
            self.violations.add(format!("{path}.op"), "is required and must be a known Operator");
            return "false".into();
        }
        if c.values.is_empty() || c.values.len() > 1000 {
            self.violations.add(format!("{path}.values"), "needs 1..1000 values");
            return "false".into();
        }
        if op != Operator::In && op != Operator::Contains && c.values.len() != 1 {
            self.violations.add(format!("{path}.values"), format!("{} takes exactly one value", op.as_str_name()));
            return "false".into();
        }
        if let Some(key) = c.field.strip_prefix("attributes.") {
            return self.attribute(key, op, &c.values, path);
        }
        let Some((_, column, kind)) = FIELDS.iter().find(|(name, _, _)| *name == c.field) else {
            let known: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
            self.violations.add(
                format!("{path}.field"),
                format!("unknown field {:?}; known: {}, attributes.<key>", c.field, known.join(", ")),
            );
            return "false".into();
        };
        let leaf = match *kind {
            Kind::Enum(parse) => {
                let mut values = Vec::new();
                for (i, v) in c.values.iter().enumerate() {
                    match parse(v) {
                        Some(x) if x != 0 => values.push(x as i16),
                        _ => self
                            .violations
                            .add(format!("{path}.values[{i}]"), format!("{v:?} is not a value of {}", c.field)),
                    }
                }
                match op {
                    Operator::Eq | Operator::In => {
                        format!("{column} = ANY({}::int2[])", self.bind(Param::Ints(values)))
                    }
                    Operator::Ne => format!("{column} <> ALL({}::int2[])", self.bind(Param::Ints(values))),
                    _ => {
                        self.violations.add(format!("{path}.op"), "enum fields take EQ, NE or IN");
                        return "false".into();
                    }
                }
            }
            Kind::Int(min, max) => {
                let mut values = Vec::new();
                for (i, v) in c.values.iter().enumerate() {
                    match v.trim().parse::<i64>() {
                        Ok(x) if (min..=max).contains(&x) => values.push(x),
                        _ => self
                            .violations
                            .add(format!("{path}.values[{i}]"), format!("must be a whole number in {min}..={max}")),
                    }
                }
                match (op, values.as_slice()) {
                    (Operator::In, _) => {
                        let p = self.bind(Param::Texts(values.iter().map(|v| v.to_string()).collect()));
                        format!("{column}::text = ANY({p}::text[])")
                    }
                    (Operator::Contains, _) => {
                        self.violations.add(format!("{path}.op"), "CONTAINS applies to tags");
                        return "false".into();
                    }
                    (op, [v]) => {
                        format!("{column} {} {}::int8", comparison(op).unwrap_or("="), self.bind(Param::Int(*v)))
                    }
                    _ => "false".into(),
                }
            }
            Kind::Tags => {
                let tags: Vec<String> = c.values.iter().map(|t| t.trim().to_lowercase()).collect();
                match op {
                    Operator::Contains | Operator::Eq => {
                        format!("{column} @> {}::text[]", self.bind(Param::Texts(tags)))
                    }
                    Operator::In => format!("{column} && {}::text[]", self.bind(Param::Texts(tags))),
                    Operator::Ne => format!("NOT ({column} @> {}::text[])", self.bind(Param::Texts(tags))),
                    _ => {
                        self.violations.add(format!("{path}.op"), "tags take CONTAINS (all of), IN (any of), EQ or NE");
                        return "false".into();
                    }
                }
            }
            Kind::Text => match op {
                Operator::In => format!("{column} = ANY({}::text[])", self.bind(Param::Texts(c.values.clone()))),
                Operator::Contains => {
                    self.violations.add(format!("{path}.op"), "CONTAINS applies to tags");
                    return "false".into();
                }
                op => format!(
                    "{column} {} {}",
                    comparison(op).unwrap_or("="),
                    self.bind(Param::Text(c.values[0].clone()))
                ),
            },
        };
        format!("COALESCE({leaf}, false)")
    }

    fn attribute(&mut self, key: &str, op: Operator, values: &[String], path: &str) -> String {
        let key_ok = key.len() <= 64
            && key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !key_ok {
            self.violations.add(format!("{path}.field"), "attribute keys match [a-z][a-z0-9_]{0,63}");
            return "false".into();
        }
        let k = self.bind(Param::Text(key.to_string()));
        let leaf = match op {
            Operator::Eq | Operator::Ne => {
                let cmp = if op == Operator::Eq { "=" } else { "<>" };
                format!("c.attributes ->> {k} {cmp} {}", self.bind(Param::Text(values[0].clone())))
            }
            Operator::In => format!("c.attributes ->> {k} = ANY({}::text[])", self.bind(Param::Texts(values.to_vec()))),
            Operator::Lt | Operator::Le | Operator::Gt | Operator::Ge => match values[0].trim().parse::<f64>() {
                Ok(n) if n.is_finite() => format!(
                    "CASE WHEN jsonb_typeof(c.attributes -> {k}) = 'number' THEN (c.attributes ->> {k})::float8 {} {}::float8 END",
                    comparison(op).unwrap_or("="),
                    self.bind(Param::Number(n))
                ),
                _ => {
                    self.violations
                        .add(format!("{path}.values[0]"), "ordering comparisons on attributes need a number");
                    return "false".into();
                }
            },
            _ => {
                self.violations.add(format!("{path}.op"), "attributes take EQ, NE, IN, LT, LE, GT or GE");
                return "false".into();
            }
        };
        format!("COALESCE({leaf}, false)")
    }
}

/// Validates `rule` (reporting every problem under `path`, e.g. "segment.rule")
/// and compiles it with placeholders numbered from `$first`.
pub fn compile(rule: Option<&RuleNode>, path: &str, first: usize) -> Result<CompiledRule, FieldViolations> {
    let mut c = Compiler { params: Vec::new(), first, nodes: 0, violations: FieldViolations::new() };
    let predicate = match rule {
        None => {
            c.violations.required(path);
            String::new()
        }
        Some(r) => c.node(r, path, 1),
    };
    if c.violations.is_empty() { Ok(CompiledRule { predicate, params: c.params }) } else { Err(c.violations) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::segmentation::v1::RuleList;

    fn cond(field: &str, op: Operator, values: &[&str]) -> RuleNode {
        RuleNode {
            node: Some(rule_node::Node::Condition(Condition {
                field: field.into(),
                op: op as i32,
                values: values.iter().map(|v| v.to_string()).collect(),
            })),
        }
    }

    fn all(nodes: Vec<RuleNode>) -> RuleNode {
        RuleNode { node: Some(rule_node::Node::All(RuleList { nodes })) }
    }

    fn not(n: RuleNode) -> RuleNode {
        RuleNode { node: Some(rule_node::Node::Not(Box::new(n))) }
    }

    #[test]
    fn a_tree_compiles_to_a_parameterised_predicate() {
        let rule = all(vec![
            cond("tier", Operator::In, &["TIER_GOLD", "TIER_DIAMOND"]),
            cond("days_since_last_purchase", Operator::Gt, &["90"]),
            not(cond("tags", Operator::Contains, &["do-not-contact"])),
        ]);
        let c = compile(Some(&rule), "rule", 1).expect("valid");
        assert_eq!(
            c.predicate,
            "(COALESCE(s.tier = ANY($1::int2[]), false) AND COALESCE(s.recency_days > $2::int8, false) AND \
             (NOT COALESCE(c.tags @> $3::text[], false)))"
        );
        assert_eq!(
            c.params,
            [
                Param::Ints(vec![Tier::Gold as i16, Tier::Diamond as i16]),
                Param::Int(90),
                Param::Texts(vec!["do-not-contact".into()])
            ]
        );
    }

    #[test]
    fn values_never_reach_the_sql_text() {
        let hostile = "x'); DROP TABLE customers; --";
        let rule =
            all(vec![cond("region", Operator::Eq, &[hostile]), cond("attributes.vip_level", Operator::Eq, &[hostile])]);
        let c = compile(Some(&rule), "rule", 3).expect("valid");
        assert!(!c.predicate.contains("DROP"), "{}", c.predicate);
        assert!(c.predicate.contains("$3") && c.predicate.contains("$5"));
        let bad_field = compile(Some(&cond("region; DROP TABLE x", Operator::Eq, &["a"])), "rule", 1).unwrap_err();
        assert_eq!(bad_field.iter().next().map(|v| v.field.as_str()), Some("rule.condition.field"));
    }

    #[test]
    fn every_problem_is_reported_with_the_path_of_its_node() {
        let rule = all(vec![
            cond("tier", Operator::In, &["TIER_GOLD", "PLATINUM"]),
            cond("rfm.recency_score", Operator::Ge, &["9"]),
            cond("colour", Operator::Eq, &["red"]),
            RuleNode { node: None },
            cond("tier", Operator::Lt, &["TIER_GOLD"]),
        ]);
        let errors = compile(Some(&rule), "segment.rule", 1).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|v| v.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "segment.rule.all.nodes[0].condition.values[1]",
                "segment.rule.all.nodes[1].condition.values[0]",
                "segment.rule.all.nodes[2].condition.field",
                "segment.rule.all.nodes[3]",
                "segment.rule.all.nodes[4].condition.op",
            ]
        );
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let mut deep = cond("churn_score", Operator::Gt, &["50"]);
        for _ in 0..MAX_DEPTH {
            deep = not(deep);
        }
        assert!(compile(Some(&deep), "rule", 1).is_err());
        let wide = all((0..MAX_CHILDREN + 1).map(|_| cond("churn_score", Operator::Gt, &["1"])).collect());
        assert!(compile(Some(&wide), "rule", 1).is_err());
        assert!(compile(None, "rule", 1).is_err());
    }
}
