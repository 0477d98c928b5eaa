//! PRF-2: phones to E.164, e-mails lower-cased, names trimmed.

use std::fmt;

/// A phone number in E.164 form, e.g. "+8613812345678".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Phone(String);

/// A lower-cased, syntactically valid e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

/// Why a value was rejected (shown to the client as the field violation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Phone {
    /// Parses common notations. Without a country code, an 11-digit number
    /// starting with 1 is taken as a mainland-China mobile (+86).
    pub fn parse(input: &str) -> Result<Phone, Invalid> {
        let trimmed = input.trim();
        if trimmed.len() > 32 {
            return Err(Invalid("is too long for a phone number".into()));
        }
        let mut digits = String::new();
        for (i, c) in trimmed.chars().enumerate() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if i == 0 => {}
                ' ' | '-' | '(' | ')' | '.' => {}
                _ => return Err(Invalid(format!("contains {c:?}; use digits, spaces, dashes and a leading +"))),
            }
        }
        let international = if trimmed.starts_with('+') {
            digits
        } else if let Some(rest) = digits.strip_prefix("00") {
            rest.to_string()
        } else if digits.len() == 11 && digits.starts_with('1') {
            format!("86{digits}")
        } else if digits.len() == 13 && digits.starts_with("861") {
            digits
        } else {
            return Err(Invalid("needs a country code, e.g. +86 138 1234 5678".into()));
        };
        if !(8..=15).contains(&international.len()) || international.starts_with('0') {
            return Err(Invalid("is not a valid international number (E.164 has 8 to 15 digits)".into()));
        }
        if let Some(national) = international.strip_prefix("86")
            && national.starts_with('1')
            && (national.len() != 11 || !matches!(national.as_bytes()[1], b'3'..=b'9'))
        {
            return Err(Invalid("is not a valid mainland-China mobile number (1[3-9] and 11 digits)".into()));
        }
        Ok(Phone(format!("+{international}")))
    }

    /// The E.164 text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Email {
    /// Parses and lower-cases an address.
    pub fn parse(input: &str) -> Result<Email, Invalid> {
        // REL-5: the size before any per-character work.
        if input.len() > 4 * 254 {
            return Err(Invalid("is longer than 254 characters".into()));
        }
        let s = input.trim().to_lowercase();
        if s.len() > 254 {
            return Err(Invalid("is longer than 254 characters".into()));
        }
        let (local, domain) = s.split_once('@').ok_or_else(|| Invalid("must contain @".into()))?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && local.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
        if !local_ok {
            return Err(Invalid("has an invalid part before @".into()));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        if !domain_ok {
            return Err(Invalid("has an invalid domain".into()));
        }
        Ok(Email(s))
    }

    /// The lower-cased text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Trims a name and checks its length (1..200 characters, no control characters).
pub fn parse_name(input: &str) -> Result<String, Invalid> {
    // REL-5: the size before any per-character work (a character is at most 4 bytes).
    if input.len() > 4 * 200 && input.chars().count() > 200 {
        return Err(Invalid("is longer than 200 characters".into()));
    }
    let name = input.split_whitespace().collect::<Vec<_>>().join(" ");
    if name.is_empty() {
        return Err(Invalid("is required".into()));
    }
    if name.chars().count() > 200 {
        return Err(Invalid("is longer than 200 characters".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(Invalid("contains control characters".into()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalise_to_e164() {
        for (input, want) in [
            ("138 1234 5678", "+8613812345678"),
            ("+86 138-1234-5678", "+8613812345678"),
            ("008613812345678", "+8613812345678"),
            ("8613812345678", "+8613812345678"),
            ("+65 8123 4567", "+6581234567"),
            ("+1 (415) 555-0100", "+14155550100"),
        ] {
            assert_eq!(Phone::parse(input).map(|p| p.0), Ok(want.to_string()), "{input}");
        }
    }

    #[test]
    fn bad_phones_are_rejected() {
        for input in
            ["", "12345", "+86 128 1234 5678", "+86 138 1234 567", "abc", "+0123456789", "555-0100", "+8613812345678x"]
        {
            assert!(Phone::parse(input).is_err(), "{input}");
        }
    }

    #[test]
    fn emails_lower_case_and_validate() {
        assert_eq!(Email::parse("  Zhang.San@Example.COM ").unwrap().as_str(), "zhang.san@example.com");
        for bad in ["no-at", "a@b", "@example.com", "a@-x.com", "a..@x.com", ".a@x.com", "a b@x.com"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(parse_name("  Wei   Li ").unwrap(), "Wei Li");
        assert!(parse_name("   ").is_err());
        assert!(parse_name(&"x".repeat(201)).is_err());
    }
}
