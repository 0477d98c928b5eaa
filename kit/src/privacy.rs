//! Masking of personal data in the SPEC 3 formats (SEC-1, SEC-4), for
//! structured fields and for free text.
//!
//! Structured fields are masked by kind: a phone keeps its first 3 and last
//! 4 digits (`138****5678`), an e-mail the first letter of its local part
//! (`z***@example.com`), a person's name its surname (`张**`, `W*** Li`).
//!
//! Free text (feedback, notes, errors echoed by a relay) is masked by
//! [`mask_text`]: every run of digits that looks like a phone number and
//! every e-mail address, whoever's, and the given names of the customers it
//! is about. It is pure and linear in the text. The names live in profiles
//! only, so services other than profiles mask their free text through
//! profiles' MaskFreeText ([`ProfilesMasker`]), and [`mask_for`] withholds
//! a text it could not mask rather than show it (fail closed).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crm_proto::profiles::v1 as profiles;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::Caller;
use crate::client::Outgoing;

/// What a caller without `pii:read` sees instead of a free text whose
/// personal data could not be masked (profiles unreachable or not configured).
pub const WITHHELD: &str = "[withheld: the personal data in this text could not be masked just now; retry later]";

/// `138****5678` for mainland numbers; other numbers keep "+", their first
/// 3 and last 4 digits.
pub fn phone(e164: &str) -> String {
    if e164.is_empty() {
        return String::new();
    }
    let digits: String = e164.chars().filter(char::is_ascii_digit).collect();
    let (prefix, national) = match digits.strip_prefix("86").filter(|n| n.len() == 11) {
        Some(n) => ("", n),
        None if e164.starts_with('+') => ("+", digits.as_str()),
        None => ("", digits.as_str()),
    };
    let n = national.len();
    if n <= 7 {
        return format!("{prefix}{}", "*".repeat(n));
    }
    format!("{prefix}{}{}{}", &national[..3], "*".repeat(n - 7), &national[n - 4..])
}

/// `z***@example.com`.
pub fn email(address: &str) -> String {
    match address.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None if address.is_empty() => String::new(),
        None => "***".into(),
    }
}

fn is_cjk(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c)
}

/// A person's name keeps the surname only: `张*` / `张**`, `W*** Li`.
pub fn name(full: &str) -> String {
    let full = full.trim();
    if full.chars().next().is_some_and(is_cjk) {
        let mut chars = full.chars();
        let surname = chars.next().map(String::from).unwrap_or_default();
        let rest = chars.filter(|c| !c.is_whitespace()).count().max(1);
        return format!("{surname}{}", "*".repeat(rest));
    }
    let words: Vec<&str> = full.split_whitespace().collect();
    match words.as_slice() {
        [] => String::new(),
        [one] => format!("{}***", one.chars().next().unwrap_or('*')),
        [first, .., last] => format!("{}*** {last}", first.chars().next().unwrap_or('*')),
    }
}

/// Masks an identifier: first 2 and last 2 characters.
pub fn identifier(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    format!(
        "{}{}{}",
        chars[..2].iter().collect::<String>(),
        "*".repeat(chars.len() - 4),
        chars[chars.len() - 2..].iter().collect::<String>()
    )
}

/// Digits a run must hold to be taken for a phone number.
const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 7..=15;

fn is_email_local(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-".contains(c)
}

fn is_email_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-'
}

/// Masks personal data in free text: phone numbers and e-mail addresses
/// anywhere, and each of `names` (the customers the text is about): the
/// full name as [`name`] masks it, and its given names alone (`三丰` in
/// `张三丰`, `Wei` in `Wei Li`) as stars or initial. Names match whole,
/// ignoring case; names shorter than two characters are left alone.
pub fn mask_text(text: &str, names: &[&str]) -> String {
    let masked = mask_emails(&mask_phones(text));
    names.iter().fold(masked, |t, n| mask_name(&t, n))
}

/// PRF-8, SEC-5: what an erasure keeps of a free text (a stated reason):
/// phone numbers and e-mails masked as in [`mask_text`], and the names gone
/// entirely, surname included (masking keeps the surname; erasing does not).
pub fn scrub_text(text: &str, names: &[&str]) -> String {
    let masked = mask_emails(&mask_phones(text));
    names.iter().fold(masked, |t, full| {
        let full = full.trim();
        let mut parts: Vec<String> = vec![full.to_string()];
        if full.chars().next().is_some_and(is_cjk) {
            parts.push(full.chars().skip(1).filter(|c| !c.is_whitespace()).collect());
        } else {
            parts.extend(full.split_whitespace().map(str::to_string));
        }
        parts.retain(|p| p.chars().count() >= 2);
        parts.sort_by_key(|p| std::cmp::Reverse(p.chars().count()));
        parts.iter().fold(t, |t, p| replace_word(&t, p, "***"))
    })
}

/// Runs of digits with the separators people write inside phone numbers
/// (space, `-`, `.`, `/`, parentheses, a leading `+`) holding 7 to 15
/// digits, not glued to letters and not shaped like a date.
fn mask_phones(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts = c.is_ascii_digit() || (c == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        // Chinese text writes numbers right after characters: only ASCII letters glue.
        if !starts || (i > 0 && chars[i - 1].is_ascii_alphanumeric()) {
            out.push(c);
            i += 1;
            continue;
        }
        // The run: digits, with at most three separators between two of them.
        let (mut end, mut gap, mut groups) = (i, 0, vec![0usize]);
        for (j, &d) in chars.iter().enumerate().skip(i) {
            if d.is_ascii_digit() {
                if gap > 0 {
                    groups.push(0);
                }
                if let Some(g) = groups.last_mut() {
                    *g += 1;
                }
                gap = 0;
                end = j + 1;
            } else if " -./()".contains(d) || (d == '+' && j == i) {
                gap += 1;
                if gap > 3 {
                    break;
                }
            } else {
                break;
            }
        }
        groups.retain(|g| *g > 0);
        let digits: usize = groups.iter().sum();
        let date = matches!(groups.as_slice(), [4, 2, 2] | [2, 2, 4] | [4, 1 | 2, 1 | 2] | [1 | 2, 1 | 2, 4]);
        let glued = chars.get(end).is_some_and(|c| c.is_ascii_alphanumeric());
        if PHONE_DIGITS.contains(&digits) && !date && !glued {
            out.push_str(&phone(&chars[i..end].iter().collect::<String>()));
        } else {
            out.extend(&chars[i..end.max(i + 1)]);
        }
        i = end.max(i + 1);
    }
    out
}

/// `local@domain.tld` anywhere, masked as [`email`].
fn mask_emails(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > copied && is_email_local(chars[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < chars.len() && is_email_domain(chars[end]) {
            end += 1;
        }
        while end > i + 1 && matches!(chars[end - 1], '.' | '-') {
            end -= 1;
        }
        let domain: String = chars[i + 1..end].iter().collect();
        if start < i && domain.contains('.') && !domain.starts_with('.') {
            out.extend(&chars[copied..start]);
            let address: String = chars[start..end].iter().collect();
            out.push_str(&email(&address));
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.extend(&chars[copied..]);
    out
}

/// The full name and its given names, each with its masked form.
fn name_parts(full: &str) -> Vec<(String, String)> {
    let full = full.trim();
    let mut parts = vec![(full.to_string(), name(full))];
    if full.chars().next().is_some_and(is_cjk) {
        let given: String = full.chars().skip(1).filter(|c| !c.is_whitespace()).collect();
        if given.chars().count() >= 2 {
            let stars = "*".repeat(given.chars().count());
            parts.push((given, stars));
        }
    } else {
        let words: Vec<&str> = full.split_whitespace().collect();
        if words.len() >= 2 {
            for given in &words[..words.len() - 1] {
                if given.chars().count() >= 2 {
                    parts.push((given.to_string(), format!("{}***", given.chars().next().unwrap_or('*'))));
                }
            }
        }
    }
    parts.retain(|(p, _)| p.chars().count() >= 2);
    parts
}

/// Replaces whole, case-insensitive occurrences of the name and its given
/// names, longest first.
fn mask_name(text: &str, full: &str) -> String {
    let mut out = text.to_string();
    for (part, masked) in name_parts(full) {
        out = replace_word(&out, &part, &masked);
    }
    out
}

/// Replaces `needle` where it stands as a word of its own (for Latin text:
/// not inside a longer word; CJK has no word boundaries, so anywhere).
fn replace_word(text: &str, needle: &str, with: &str) -> String {
    let hay: Vec<char> = text.chars().collect();
    let pat: Vec<char> = needle.chars().collect();
    if pat.is_empty() || pat.len() > hay.len() {
        return text.to_string();
    }
    let cjk = pat.iter().any(|c| is_cjk(*c));
    let eq = |a: char, b: char| a == b || a.to_lowercase().eq(b.to_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < hay.len() {
        let fits = i + pat.len() <= hay.len() && pat.iter().enumerate().all(|(k, p)| eq(hay[i + k], *p));
        let bounded = cjk
            || ((i == 0 || !hay[i - 1].is_alphanumeric())
                && hay.get(i + pat.len()).is_none_or(|c| !c.is_alphanumeric()));
        if fits && bounded {
            out.push_str(with);
            i += pat.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// The future of a masking call.
pub type Masking<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send + 'a>>;

/// Masks free texts about customers: `(customer id, text)` in, masked texts
/// out, in order. An error means "not masked": the caller withholds.
pub trait TextMasker: Send + Sync {
    /// Masks `texts`.
    fn mask(&self, texts: Vec<(String, String)>) -> Masking<'_>;
}

/// Texts per MaskFreeText call, and characters per call (profiles' limits).
const MASK_BATCH: usize = 1000;
const MASK_CHARS: usize = 1_000_000;
const MASK_TEXT_CHARS: usize = 20_000;

/// Masking through profiles' MaskFreeText (SEC-4): profiles holds the names.
#[derive(Clone)]
pub struct ProfilesMasker {
    client: ProfilesServiceClient<InterceptedService<Channel, Outgoing>>,
    timeout: Duration,
}

impl ProfilesMasker {
    /// A masker calling profiles at `url` with the service's token.
    pub fn new(url: &str, outgoing: Outgoing, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = crate::client::channel(url)?;
        Ok(Self { client: ProfilesServiceClient::with_interceptor(channel, outgoing), timeout })
    }

    async fn call(&self, texts: Vec<profiles::FreeText>) -> Result<Vec<String>, String> {
        let n = texts.len();
        let mut request = tonic::Request::new(profiles::MaskFreeTextRequest { texts });
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        let masked = tokio::time::timeout(self.timeout, client.mask_free_text(request))
            .await
            .map_err(|_| "profiles MaskFreeText timed out".to_string())?
            .map_err(|s| format!("profiles MaskFreeText: {:?} {}", s.code(), s.message()))?
            .into_inner()
            .texts;
        if masked.len() != n {
            return Err(format!("profiles MaskFreeText answered {} texts for {n}", masked.len()));
        }
        Ok(masked)
    }
}

impl TextMasker for ProfilesMasker {
    fn mask(&self, texts: Vec<(String, String)>) -> Masking<'_> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(texts.len());
            let mut batch: Vec<profiles::FreeText> = Vec::new();
            let mut chars = 0usize;
            for (customer_id, text) in texts {
                let len = text.chars().count();
                if len > MASK_TEXT_CHARS {
                    return Err(format!("a text of {len} characters is longer than profiles masks"));
                }
                if batch.len() == MASK_BATCH || chars + len > MASK_CHARS {
                    out.extend(self.call(std::mem::take(&mut batch)).await?);
                    chars = 0;
                }
                chars += len;
                batch.push(profiles::FreeText { customer_id, text });
            }
            if !batch.is_empty() {
                out.extend(self.call(batch).await?);
            }
            Ok(out)
        })
    }
}

/// SEC-4: shows free texts to `caller`: unchanged with `pii:read`; else
/// masked through `masker` (`(customer id, text)` pairs), and withheld
/// ([`WITHHELD`]) when they cannot be masked. Empty texts stay empty.
pub async fn mask_for(caller: &Caller, masker: Option<&dyn TextMasker>, mut texts: Vec<(String, &mut String)>) {
    if caller.can_read_pii() {
        return;
    }
    texts.retain(|(_, t)| !t.is_empty());
    if texts.is_empty() {
        return;
    }
    let masked = match masker {
        Some(m) => m.mask(texts.iter().map(|(c, t)| (c.clone(), t.to_string())).collect()).await,
        None => Err("no masker configured".to_string()),
    };
    match masked {
        Ok(masked) => {
            for ((_, text), m) in texts.into_iter().zip(masked) {
                *text = m;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, texts = texts.len(), "free text withheld: it could not be masked (SEC-4)");
            for (_, text) in texts {
                *text = WITHHELD.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_follow_spec_section_3() {
        assert_eq!(phone("+8613812345678"), "138****5678");
        assert_eq!(phone("+6581234567"), "+658***4567");
        assert_eq!(email("zhang.san@example.com"), "z***@example.com");
        assert_eq!(name("张三"), "张*");
        assert_eq!(name("张伟明"), "张**");
        assert_eq!(name("Wei Li"), "W*** Li");
        assert_eq!(name("Madonna"), "M***");
        assert_eq!(identifier("wx-123456"), "wx*****56");
    }

    #[test]
    fn sec4_phones_in_free_text_are_masked_in_any_common_format() {
        for (text, want) in [
            ("call me on 13812345678 please", "call me on 138****5678 please"),
            ("my number: 138 1234 5678.", "my number: 138****5678."),
            ("手机13812345678，谢谢", "手机138****5678，谢谢"),
            ("+86 138-1234-5678", "138****5678"),
            ("(021) 6234 5678", "(021****5678"),
            ("tel 021-62345678 ext", "tel 021****5678 ext"),
        ] {
            assert_eq!(mask_text(text, &[]), want, "{text:?}");
        }
    }

    #[test]
    fn sec4_numbers_that_are_not_phones_stay() {
        for text in ["order 12345 arrived", "paid 199.00 CNY on 2026-12-04", "ticket ABC1234567890X", "v1.2.3"] {
            assert_eq!(mask_text(text, &[]), text);
        }
    }

    #[test]
    fn sec4_emails_in_free_text_are_masked() {
        assert_eq!(
            mask_text("write to Zhang.San@Example.com or to li@x.cn.", &[]),
            "write to Z***@Example.com or to l***@x.cn."
        );
        assert_eq!(
            mask_text("an @ sign alone, a@b and user@localhost", &[]),
            "an @ sign alone, a@b and user@localhost"
        );
    }

    #[test]
    fn sec4_the_customers_name_and_given_names_are_masked() {
        assert_eq!(mask_text("我是张三丰，三丰的订单没到", &["张三丰"]), "我是张**，**的订单没到");
        assert_eq!(mask_text("Wei Li here; wei again. Weird.", &["Wei Li"]), "W*** Li here; W*** again. Weird.");
        assert_eq!(mask_text("Nothing about them", &["Wei Li"]), "Nothing about them");
        assert_eq!(mask_text("X", &["X"]), "X", "one-letter names are not masked");
    }

    #[test]
    fn sec5_an_erased_text_keeps_no_part_of_the_name() {
        assert_eq!(
            scrub_text("request of Wei Li (wei.li@example.com, 13812345678); Li called", &["Wei Li"]),
            "request of *** (w***@example.com, 138****5678); *** called"
        );
        assert_eq!(scrub_text("张三丰本人申请，三丰", &["张三丰"]), "***本人申请，***");
    }

    #[test]
    fn sec4_masking_is_linear_in_the_text() {
        let long = "13812345678 a@b.cn 张三丰 ".repeat(20_000);
        let started = std::time::Instant::now();
        let masked = mask_text(&long, &["张三丰"]);
        assert!(!masked.contains("13812345678") && !masked.contains("张三丰"));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
