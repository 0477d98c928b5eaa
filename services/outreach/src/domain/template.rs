//! OUT-2: templates with `{{variable}}` placeholders, per channel and locale.
//! A template is parsed once at save; an unknown variable, an unclosed
//! placeholder or an unsupported locale is a field error then, so rendering
//! at send time cannot fail on the template itself.

use std::collections::{BTreeMap, BTreeSet};

/// Locales a template body may be written in.
pub const LOCALES: &[&str] = &["zh-CN", "en"];

/// Variables a template may use, and where they come from.
pub const VARIABLES: &[(&str, &str)] = &[
    ("name", "the customer's name (from profiles at send time)"),
    ("tier", "the customer's value tier"),
    ("discount", "the tier discount, e.g. \"15%\" (OUT-6)"),
    ("points", "the points balance (OUT-6)"),
    ("coupon_value", "the coupon value of the points, e.g. \"12.34 CNY\" (OUT-6)"),
    ("offer_code", "an offer code given by the sender"),
    ("campaign_name", "the campaign's display name"),
    ("ticket_id", "the feedback ticket (acknowledgements)"),
    ("feedback_id", "the feedback item (acknowledgements)"),
];

/// OUT-6: variables the rules compute (the offer of the customer's tier,
/// the name read from profiles at send time, the campaign's own name). A
/// caller never sets them: an agent cannot promise "90 % off".
pub const COMPUTED: &[&str] = &["name", "tier", "discount", "points", "coupon_value", "campaign_name"];

/// Whether a caller may give `name` a value: a known variable the rules do not compute.
pub fn is_free(name: &str) -> bool {
    VARIABLES.iter().any(|(v, _)| *v == name) && !COMPUTED.contains(&name)
}

/// Longest body accepted.
pub const MAX_BODY: usize = 4000;

/// One piece of a parsed text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(String),
}

/// A parsed text: literal pieces and variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(Vec<Piece>);

/// Why a text does not parse or render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// `{{` without `}}`.
    Unclosed,
    /// `{{}}` or a name with other characters than a-z, 0-9 and `_`.
    BadName(String),
    /// Not one of [`VARIABLES`].
    UnknownVariable(String),
    /// No value at render time.
    MissingValue(String),
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateError::Unclosed => write!(f, "has a `{{{{` without its `}}}}`"),
            TemplateError::BadName(n) => write!(f, "has a placeholder {{{{{n}}}}} that is not a variable name"),
            TemplateError::UnknownVariable(n) => {
                let known: Vec<&str> = VARIABLES.iter().map(|(v, _)| *v).collect();
                write!(f, "uses unknown variable {{{{{n}}}}}; known: {}", known.join(", "))
            }
            TemplateError::MissingValue(n) => write!(f, "needs a value for {{{{{n}}}}}"),
        }
    }
}

impl Text {
    /// Parses `s`, accepting only known variables.
    pub fn parse(s: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or(TemplateError::Unclosed)?;
            let name = after[..close].trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                return Err(TemplateError::BadName(name.to_string()));
            }
            if !VARIABLES.iter().any(|(v, _)| *v == name) {
                return Err(TemplateError::UnknownVariable(name.to_string()));
            }
            pieces.push(Piece::Var(name.to_string()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Text(pieces))
    }

    /// Variables used.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// Renders with `values`; every variable used must have one.
    pub fn render(&self, values: &BTreeMap<String, String>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => out.push_str(values.get(v).ok_or_else(|| TemplateError::MissingValue(v.clone()))?),
            }
        }
        Ok(out)
    }
}

/// One locale's parsed subject and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Locale.
    pub locale: String,
    /// Subject.
    pub subject: Text,
    /// Body.
    pub body: Text,
}

/// The variables used by all bodies, sorted.
pub fn variables_of(bodies: &[Body]) -> Vec<String> {
    let set: BTreeSet<&str> = bodies.iter().flat_map(|b| b.subject.variables().chain(b.body.variables())).collect();
    set.into_iter().map(str::to_string).collect()
}

/// Picks the body for `locale`, else zh-CN, else the first.
pub fn pick<'a>(bodies: &'a [Body], locale: &str) -> Option<&'a Body> {
    bodies
        .iter()
        .find(|b| b.locale == locale)
        .or_else(|| bodies.iter().find(|b| b.locale == "zh-CN"))
        .or_else(|| bodies.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out6_offer_values_are_computed_and_only_the_rest_is_free() {
        for computed in ["name", "tier", "discount", "points", "coupon_value", "campaign_name"] {
            assert!(!is_free(computed), "{computed}");
        }
        for free in ["offer_code", "ticket_id", "feedback_id"] {
            assert!(is_free(free), "{free}");
        }
        assert!(!is_free("made_up"));
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn renders_known_variables_in_chinese_and_english() {
        let t = Text::parse("{{name}}，您好！{{tier}}会员专享{{ discount }}折扣").unwrap();
        let out = t.render(&values(&[("name", "张*"), ("tier", "金卡"), ("discount", "15%")])).unwrap();
        assert_eq!(out, "张*，您好！金卡会员专享15%折扣");
        assert_eq!(t.variables().collect::<Vec<_>>(), ["name", "tier", "discount"]);
    }

    #[test]
    fn mistakes_are_caught_at_parse_time() {
        assert_eq!(Text::parse("Hi {{nmae}}"), Err(TemplateError::UnknownVariable("nmae".into())));
        assert_eq!(Text::parse("Hi {{name"), Err(TemplateError::Unclosed));
        assert_eq!(Text::parse("Hi {{}}"), Err(TemplateError::BadName("".into())));
        assert_eq!(Text::parse("Hi {{ drop table }}"), Err(TemplateError::BadName("drop table".into())));
        assert!(Text::parse("no variables at all, { single } braces").is_ok());
    }

    #[test]
    fn rendering_names_the_missing_value() {
        let t = Text::parse("{{points}} points").unwrap();
        assert_eq!(t.render(&values(&[])), Err(TemplateError::MissingValue("points".into())));
    }

    #[test]
    fn a_locale_falls_back_to_chinese_then_the_first() {
        let body =
            |l: &str| Body { locale: l.into(), subject: Text::parse("").unwrap(), body: Text::parse(l).unwrap() };
        let both = [body("en"), body("zh-CN")];
        assert_eq!(pick(&both, "en").unwrap().locale, "en");
        assert_eq!(pick(&both, "fr").unwrap().locale, "zh-CN");
        assert_eq!(pick(&[body("en")], "zh-CN").unwrap().locale, "en");
    }
}
