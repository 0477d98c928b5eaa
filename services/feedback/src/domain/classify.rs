//! FBK-2: category, urgency and sentiment of a feedback text, in Chinese and
//! English, explainable (every decision lists the terms that made it).
//!
//! Chinese text is cut into words by jieba (its dictionary plus every term of
//! our domain lexicon, so "态度差" or "闪退" stay one word); English text by
//! words. Words are then matched against the lexicon (`lexicon/*.tsv`): a term
//! carries cues (a category weight, urgency, a sentiment weight, a topic) or
//! modifies its neighbours (negators flip the sentiment of the next term,
//! intensifiers strengthen it, a contrast word such as "但是"/"but" shifts the
//! weight to what follows). Multi-word English phrases ("how do i") match
//! longest first. The rating, when given, adds to the sentiment.
//!
//! Measured on a labelled evaluation set (`eval/feedback_eval.tsv`, half of it
//! held out from tuning): see BENCHMARKS.md.

use std::collections::HashMap;

use jieba_rs::Jieba;

/// The four categories (FBK-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Product suggestion.
    ProductSuggestion,
    /// Service complaint.
    ServiceComplaint,
    /// Function inquiry.
    FunctionInquiry,
    /// Anything else (praise, thanks, unrelated).
    Other,
}

impl Category {
    /// All categories in a fixed order.
    pub const ALL: [Category; 4] =
        [Category::ProductSuggestion, Category::ServiceComplaint, Category::FunctionInquiry, Category::Other];

    /// The short name used in lexicons, evidence and the evaluation set.
    pub fn key(self) -> &'static str {
        match self {
            Category::ProductSuggestion => "suggestion",
            Category::ServiceComplaint => "complaint",
            Category::FunctionInquiry => "inquiry",
            Category::Other => "other",
        }
    }

    /// Parses [`Category::key`].
    pub fn from_key(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.key() == s)
    }
}

/// Language of a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Chinese.
    Zh,
    /// English (and anything without CJK characters).
    En,
}

impl Language {
    /// "zh" or "en".
    pub fn code(self) -> &'static str {
        match self {
            Language::Zh => "zh",
            Language::En => "en",
        }
    }

    /// The locale of a reply in this language.
    pub fn locale(self) -> &'static str {
        match self {
            Language::Zh => "zh-CN",
            Language::En => "en",
        }
    }
}

/// One term and what it contributed.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// The term as found (after segmentation).
    pub term: String,
    /// "category:complaint", "urgency", "sentiment", "topic:delivery", "rating".
    pub signal: String,
    /// Weight contributed (after negation and intensity).
    pub weight: f64,
}

/// The result of classifying a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Category.
    pub category: Category,
    /// Confidence 0..1 (share of the winning category's score).
    pub confidence: f64,
    /// Urgent (safety, legal threat, money taken, repeated failure).
    pub urgent: bool,
    /// Sentiment -1..1.
    pub sentiment: f64,
    /// Language detected.
    pub language: Language,
    /// Terms that decided it.
    pub evidence: Vec<Evidence>,
    /// Topic key for repeat detection (FBK-4), e.g. "delivery"; "general" if none matched.
    pub topic: String,
}

/// Sentiment polarity, as the evaluation set labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Polarity {
    /// Below -[`POLARITY_BAND`].
    Negative,
    /// Within the band.
    Neutral,
    /// Above the band.
    Positive,
}

/// Half-width of the neutral sentiment band.
pub const POLARITY_BAND: f64 = 0.15;

impl Polarity {
    /// The polarity of a sentiment score.
    pub fn of(sentiment: f64) -> Polarity {
        if sentiment < -POLARITY_BAND {
            Polarity::Negative
        } else if sentiment > POLARITY_BAND {
            Polarity::Positive
        } else {
            Polarity::Neutral
        }
    }

    /// "negative", "neutral", "positive".
    pub fn key(self) -> &'static str {
        match self {
            Polarity::Negative => "negative",
            Polarity::Neutral => "neutral",
            Polarity::Positive => "positive",
        }
    }

    /// Parses [`Polarity::key`].
    pub fn from_key(s: &str) -> Option<Polarity> {
        [Polarity::Negative, Polarity::Neutral, Polarity::Positive].into_iter().find(|p| p.key() == s)
    }
}

/// What a lexicon term does.
#[derive(Debug, Clone, PartialEq)]
enum Cue {
    Category(Category, f64),
    Urgency(f64),
    Sentiment(f64),
    Topic(String, f64),
    /// Flips the sentiment (and cancels the category cues) of the next terms in the clause.
    Negator,
    /// Multiplies the sentiment of the next sentiment term.
    Intensifier(f64),
    /// "but": what came before counts less, what follows more.
    Contrast,
    /// "如果", "would": the rest of the clause is hypothetical, its sentiment counts little.
    Hypothetical,
}

/// A lexicon line that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("lexicon line {line}: {reason}")]
pub struct LexiconError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

fn parse_cue(s: &str) -> Result<Cue, String> {
    let weight = |w: &str| w.parse::<f64>().map_err(|_| format!("bad weight {w:?} in {s:?}"));
    match s {
        "neg" => return Ok(Cue::Negator),
        "contrast" => return Ok(Cue::Contrast),
        "hypo" => return Ok(Cue::Hypothetical),
        _ => {}
    }
    let (name, w) = s.rsplit_once(':').ok_or_else(|| format!("cue {s:?} is not name:weight"))?;
    if let Some(c) = Category::from_key(name) {
        return Ok(Cue::Category(c, weight(w)?));
    }
    match name {
        "urgent" => Ok(Cue::Urgency(weight(w)?)),
        "sent" => Ok(Cue::Sentiment(weight(w)?)),
        "int" => Ok(Cue::Intensifier(weight(w)?)),
        _ => match name.strip_prefix("topic=") {
            Some(t) if !t.is_empty() => Ok(Cue::Topic(t.to_string(), weight(w)?)),
            _ => Err(format!("unknown cue {s:?}")),
        },
    }
}

/// A lexicon term: its words and cues.
type Term = (Vec<String>, Vec<Cue>);

/// The domain lexicon: term (one or more words) -> cues.
#[derive(Debug, Default)]
pub struct Lexicon {
    /// Keyed by the first word; phrases longest first.
    entries: HashMap<String, Vec<Term>>,
    /// Every Chinese term, for jieba's dictionary.
    chinese_terms: Vec<String>,
}

impl Lexicon {
    /// Parses TSV lines `term<TAB>cue cue ...` (`#` starts a comment).
    /// English terms may be phrases of words separated by spaces.
    pub fn parse(text: &str) -> Result<Lexicon, LexiconError> {
        let mut lex = Lexicon::default();
        lex.extend(text)?;
        Ok(lex)
    }

    /// Adds the lines of another lexicon file.
    pub fn extend(&mut self, text: &str) -> Result<(), LexiconError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim_end();
            if line.trim().is_empty() {
                continue;
            }
            let err = |reason: String| LexiconError { line: i + 1, reason };
            let (term, cues) = line.split_once('\t').ok_or_else(|| err("expected term<TAB>cues".into()))?;
            let term = term.trim().to_lowercase();
            if term.is_empty() {
                return Err(err("empty term".into()));
            }
            let cues = cues.split_whitespace().map(parse_cue).collect::<Result<Vec<_>, _>>().map_err(err)?;
            if cues.is_empty() {
                return Err(err("a term needs at least one cue".into()));
            }
            let words: Vec<String> = if has_cjk(&term) {
                self.chinese_terms.push(term.clone());
                vec![term]
            } else {
                term.split_whitespace().map(str::to_string).collect()
            };
            let first = words[0].clone();
            let list = self.entries.entry(first).or_default();
            if list.iter().any(|(w, _)| *w == words) {
                // A second line would be shadowed by the first without a word.
                return Err(err(format!("{:?} is already in the lexicon", words.join(" "))));
            }
            list.push((words, cues));
            list.sort_by_key(|(w, _)| std::cmp::Reverse(w.len()));
        }
        Ok(())
    }

    /// Number of terms.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    /// Whether it has no terms.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest entry starting at `words[i]`: (its length in words, cues).
    fn longest_match(&self, words: &[String], i: usize) -> Option<(usize, &[Cue])> {
        let candidates = self.entries.get(&words[i])?;
        candidates
            .iter()
            .find(|(phrase, _)| words.len() - i >= phrase.len() && words[i..i + phrase.len()] == phrase[..])
            .map(|(phrase, cues)| (phrase.len(), cues.as_slice()))
    }
}

/// The shipped lexicons (Chinese and English).
pub const ZH_LEXICON: &str = include_str!("../../lexicon/zh.tsv");
/// See [`ZH_LEXICON`].
pub const EN_LEXICON: &str = include_str!("../../lexicon/en.tsv");

/// Longest text accepted (characters).
pub const MAX_TEXT_CHARS: usize = 10_000;

/// Urgency score from which a text is urgent.
const URGENT_AT: f64 = 2.0;
/// Category score below which nothing was really recognised: OTHER.
const MIN_CATEGORY_SCORE: f64 = 0.75;
/// How much a clearly negative tone counts towards a complaint, per unit of raw sentiment.
const NEGATIVITY_TO_COMPLAINT: f64 = 0.45;
/// Raw sentiment is squashed by tanh(raw / SENTIMENT_SCALE).
const SENTIMENT_SCALE: f64 = 2.5;
/// Share of its weight a sentiment term keeps in a hypothetical clause.
const HYPOTHETICAL_WEIGHT: f64 = 0.3;
/// Sentiment a complaint gets at least (raw): dissatisfaction is what makes it one.
const COMPLAINT_TONE: f64 = -0.6;
/// Topic score from which an otherwise unrecognised text is about the service.
const SERVICE_TOPIC: f64 = 1.5;
/// Share of its sentiment an inquiry keeps.
const INQUIRY_TONE: f64 = 0.5;
/// Share of its sentiment a suggestion keeps.
const SUGGESTION_TONE: f64 = 0.4;
/// Words after a negator that it still reaches (within the clause).
const NEGATION_REACH: usize = 3;

fn has_cjk(s: &str) -> bool {
    s.chars().any(is_cjk)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF)
}

fn is_clause_break(w: &str) -> bool {
    matches!(w, "，" | "。" | "！" | "？" | "；" | "," | "." | "!" | "?" | ";" | "…" | "~" | "～" | "\n" | "：" | ":")
}

/// A classifier: jieba with the domain words, and the lexicon. Build it once
/// (loading jieba's dictionary takes a few hundred milliseconds) and share it.
pub struct Classifier {
    jieba: Jieba,
    lexicon: Lexicon,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier").field("terms", &self.lexicon.len()).finish()
    }
}

impl Classifier {
    /// The classifier with the shipped lexicons.
    pub fn shipped() -> Result<Classifier, LexiconError> {
        let mut lexicon = Lexicon::parse(ZH_LEXICON)?;
        lexicon.extend(EN_LEXICON)?;
        Ok(Classifier::with_lexicon(lexicon))
    }

    /// A classifier over `lexicon`.
    pub fn with_lexicon(lexicon: Lexicon) -> Classifier {
        let mut jieba = Jieba::new();
        for term in &lexicon.chinese_terms {
            // A frequency high enough that jieba keeps the domain term whole.
            jieba.add_word(term, Some(200_000), None);
        }
        Classifier { jieba, lexicon }
    }

    /// The words of `text`: jieba for runs of Chinese, lower-cased words
    /// for the rest; punctuation that ends a clause is kept as a word.
    pub fn words(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut run = String::new();
        let mut run_is_cjk = false;
        let flush = |run: &mut String, cjk: bool, out: &mut Vec<String>| {
            if run.is_empty() {
                return;
            }
            if cjk {
                for t in self.jieba.cut(run, true) {
                    let w = t.word.trim();
                    if !w.is_empty() {
                        out.push(w.to_string());
                    }
                }
            } else {
                english_words(run, out);
            }
            run.clear();
        };
        for c in text.chars() {
            let cjk = is_cjk(c) || matches!(c, '，' | '。' | '！' | '？' | '；' | '：' | '…' | '～');
            if cjk != run_is_cjk {
                flush(&mut run, run_is_cjk, &mut out);
                run_is_cjk = cjk;
            }
            run.push(c);
        }
        flush(&mut run, run_is_cjk, &mut out);
        out
    }

    /// Classifies `text` (with the customer's rating 1..5, if given).
    pub fn classify(&self, text: &str, rating: Option<u8>) -> Classification {
        let cjk = text.chars().filter(|c| is_cjk(*c)).count();
        let letters = text.chars().filter(|c| c.is_alphabetic()).count().max(1);
        let language = if cjk * 5 >= letters { Language::Zh } else { Language::En };
        let words = self.words(text);

        let mut category_score: HashMap<Category, f64> = HashMap::new();
        let mut topic_score: HashMap<String, f64> = HashMap::new();
        let mut urgency = 0.0;
        let mut sentiment = 0.0;
        let mut evidence = Vec::new();
        let mut negated_until: Option<usize> = None;
        let mut intensity = 1.0;
        let mut after_contrast = false;
        let mut first_clause = true;
        let mut hypothetical = false;

        let mut i = 0;
        while i < words.len() {
            if is_clause_break(&words[i]) {
                first_clause = false;
                hypothetical = false;
                negated_until = None;
                intensity = 1.0;
                if words[i] == "?" || words[i] == "？" {
                    *category_score.entry(Category::FunctionInquiry).or_default() += 0.9;
                    evidence.push(Evidence { term: words[i].clone(), signal: "category:inquiry".into(), weight: 0.9 });
                }
                i += 1;
                continue;
            }
            let Some((len, cues)) = self.lexicon.longest_match(&words, i) else {
                i += 1;
                continue;
            };
            let term = words[i..i + len].join(if language == Language::Zh { "" } else { " " });
            let negated = negated_until.is_some_and(|end| i <= end);
            let mut modifier_only = true;
            for cue in cues {
                match cue {
                    Cue::Negator => negated_until = Some(i + len - 1 + NEGATION_REACH),
                    Cue::Intensifier(x) => intensity = *x,
                    Cue::Hypothetical => hypothetical = true,
                    Cue::Contrast => {
                        // What came before the "but" counts less.
                        sentiment *= 0.5;
                        after_contrast = true;
                    }
                    Cue::Category(c, w) => {
                        modifier_only = false;
                        if negated {
                            continue;
                        }
                        *category_score.entry(*c).or_default() += w;
                        evidence.push(Evidence {
                            term: term.clone(),
                            signal: format!("category:{}", c.key()),
                            weight: *w,
                        });
                    }
                    Cue::Urgency(w) => {
                        modifier_only = false;
                        urgency += w;
                        evidence.push(Evidence { term: term.clone(), signal: "urgency".into(), weight: *w });
                    }
                    Cue::Topic(t, w) => {
                        modifier_only = false;
                        // What a customer names first is usually what the feedback is about.
                        let w = if first_clause { w * 1.5 } else { *w };
                        *topic_score.entry(t.clone()).or_default() += w;
                        evidence.push(Evidence { term: term.clone(), signal: format!("topic:{t}"), weight: w });
                    }
                    Cue::Sentiment(w) => {
                        modifier_only = false;
                        let mut w = w * intensity;
                        if negated {
                            // "不满意" is in the lexicon as negative; "不 + 满意" flips, a little weaker.
                            w = -w * 0.8;
                        }
                        if after_contrast {
                            w *= 1.3;
                        }
                        if hypothetical {
                            w *= HYPOTHETICAL_WEIGHT;
                        }
                        intensity = 1.0;
                        sentiment += w;
                        evidence.push(Evidence { term: term.clone(), signal: "sentiment".into(), weight: round3(w) });
                    }
                }
            }
            if negated && !modifier_only {
                // A negator reaches the next content word only.
                negated_until = None;
            }
            i += len;
        }

        if let Some(r) = rating.filter(|r| (1..=5).contains(r)) {
            let w = (f64::from(r) - 3.0) * 0.6;
            if w != 0.0 {
                sentiment += w;
                evidence.push(Evidence { term: format!("rating {r}"), signal: "sentiment".into(), weight: w });
            }
        }
        // A clearly negative tone is itself a sign of a complaint.
        if sentiment < -1.0 {
            let w = round3((-sentiment - 1.0) * NEGATIVITY_TO_COMPLAINT + 0.4);
            *category_score.entry(Category::ServiceComplaint).or_default() += w;
            evidence.push(Evidence { term: "(negative tone)".into(), signal: "category:complaint".into(), weight: w });
        }

        let strongest_topic = topic_score.values().copied().fold(0.0, f64::max);
        let (mut category, mut confidence) = decide(&category_score);
        if category == Category::Other && confidence <= 0.5 && strongest_topic >= SERVICE_TOPIC && sentiment <= 0.0 {
            // Nothing else recognised, but the customer tells us about a part of
            // the service (a delivery, a refund, a store) without praise, a
            // question or a suggestion: in a feedback channel that is most often
            // a complaint told as plain narrative ("the soup spilled during
            // delivery"). Closing remarks ("no need to follow up") are lexicon
            // terms of OTHER, so they do not land here.
            category = Category::ServiceComplaint;
            confidence = 0.4;
            evidence.push(Evidence {
                term: "(service matter, no question, suggestion or praise)".into(),
                signal: "category:complaint".into(),
                weight: round3(strongest_topic),
            });
        }
        // Questions and suggestions are mostly matter-of-fact: "I lost my card, how do I replace it?"
        let damping = match category {
            Category::FunctionInquiry => INQUIRY_TONE,
            Category::ProductSuggestion => SUGGESTION_TONE,
            _ => 1.0,
        };
        sentiment *= damping;
        if category == Category::ServiceComplaint && sentiment > COMPLAINT_TONE {
            let w = round3(COMPLAINT_TONE - sentiment);
            sentiment = COMPLAINT_TONE;
            evidence.push(Evidence { term: "(complaint)".into(), signal: "sentiment".into(), weight: w });
        }
        let topic = topic_score
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(t, _)| t)
            .unwrap_or_else(|| "general".into());
        Classification {
            category,
            confidence,
            urgent: urgency >= URGENT_AT,
            sentiment: round3((sentiment / SENTIMENT_SCALE).tanh()),
            language,
            evidence,
            topic,
        }
    }
}

fn decide(scores: &HashMap<Category, f64>) -> (Category, f64) {
    let mut ranked: Vec<(Category, f64)> =
        Category::ALL.iter().map(|c| (*c, scores.get(c).copied().unwrap_or(0.0))).collect();
    // Ties: complaint before inquiry before suggestion before other (the costlier miss first).
    let rank = |c: Category| match c {
        Category::ServiceComplaint => 0,
        Category::FunctionInquiry => 1,
        Category::ProductSuggestion => 2,
        Category::Other => 3,
    };
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| rank(a.0).cmp(&rank(b.0))));
    let (top, top_score) = ranked[0];
    if top_score < MIN_CATEGORY_SCORE {
        return (Category::Other, 0.5);
    }
    let total: f64 = ranked.iter().map(|(_, s)| s.max(0.0)).sum::<f64>() + 0.5;
    (top, round3((top_score / total).clamp(0.0, 1.0)))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn english_words(text: &str, out: &mut Vec<String>) {
    let mut word = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() || c == '\'' || c == '’' {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            push_english(&mut word, out);
        }
        if matches!(c, ',' | '.' | '!' | '?' | ';' | ':' | '\n') {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        push_english(&mut word, out);
    }
}

/// "don't" -> "do" "not"; "isn't" -> "is" "not"; "can't" -> "can" "not".
fn push_english(word: &mut String, out: &mut Vec<String>) {
    let w = word.replace('’', "'");
    word.clear();
    let w = w.trim_matches('\'');
    if w.is_empty() {
        return;
    }
    if w == "can't" || w == "cannot" {
        out.push("can".into());
        out.push("not".into());
    } else if w == "won't" {
        out.push("will".into());
        out.push("not".into());
    } else if let Some(stem) = w.strip_suffix("n't") {
        out.push(stem.to_string());
        out.push("not".into());
    } else if let Some(stem) = w.strip_suffix("'s").or_else(|| w.strip_suffix("'ve")).or_else(|| w.strip_suffix("'m")) {
        out.push(stem.to_string());
    } else {
        out.push(w.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn classifier() -> &'static Classifier {
        static C: OnceLock<Classifier> = OnceLock::new();
        C.get_or_init(|| Classifier::shipped().expect("shipped lexicons parse"))
    }

    #[test]
    fn the_shipped_lexicons_parse() {
        assert!(classifier().lexicon.len() > 300, "{}", classifier().lexicon.len());
    }

    #[test]
    fn bad_lexicon_lines_name_their_line() {
        let err = Lexicon::parse("ok\tcomplaint:1\nbroken line\n").unwrap_err();
        assert_eq!(err.line, 2);
        let err = Lexicon::parse("x\tcomplaint:heavy\n").unwrap_err();
        assert!(err.reason.contains("bad weight"), "{err}");
        let err = Lexicon::parse("x\tflavour:1\n").unwrap_err();
        assert!(err.reason.contains("unknown cue"), "{err}");
        let err = Lexicon::parse("on hold\tcomplaint:1\nx\tsent:1\nOn  Hold\tsent:-1\n").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.reason.contains("already"), "{err}");
    }

    #[test]
    fn chinese_is_cut_into_words_with_the_domain_terms_whole() {
        let words = classifier().words("客服态度差，APP老是闪退！");
        assert!(words.contains(&"态度差".to_string()), "{words:?}");
        assert!(words.contains(&"闪退".to_string()), "{words:?}");
        assert!(words.contains(&"app".to_string()), "{words:?}");
    }

    #[test]
    fn english_contractions_become_a_negation() {
        let mut out = Vec::new();
        english_words("It doesn't work, I can't log in.", &mut out);
        assert_eq!(out, ["it", "does", "not", "work", ",", "i", "can", "not", "log", "in", "."]);
    }

    #[test]
    fn a_chinese_complaint_is_a_negative_complaint_with_its_evidence() {
        let c = classifier().classify("快递一个星期都没到，打客服电话也没人接，太失望了！", None);
        assert_eq!(c.category, Category::ServiceComplaint, "{c:?}");
        assert_eq!(c.language, Language::Zh);
        assert!(c.sentiment < -POLARITY_BAND, "{c:?}");
        assert_eq!(c.topic, "delivery", "{c:?}");
        assert!(c.evidence.iter().any(|e| e.signal == "category:complaint"), "{c:?}");
    }

    #[test]
    fn an_english_question_is_an_inquiry_and_neutral() {
        let c = classifier().classify("How do I change the delivery address on an order I already placed?", None);
        assert_eq!(c.category, Category::FunctionInquiry, "{c:?}");
        assert_eq!(Polarity::of(c.sentiment), Polarity::Neutral, "{c:?}");
        assert_eq!(c.language, Language::En);
    }

    #[test]
    fn a_suggestion_is_recognised_in_both_languages() {
        let zh = classifier().classify("建议APP增加夜间模式，晚上看着太刺眼了", None);
        assert_eq!(zh.category, Category::ProductSuggestion, "{zh:?}");
        let en = classifier().classify("It would be great if you added a dark mode to the app.", None);
        assert_eq!(en.category, Category::ProductSuggestion, "{en:?}");
    }

    #[test]
    fn negation_flips_sentiment() {
        let happy = classifier().classify("I am satisfied with the service", None);
        let unhappy = classifier().classify("I am not satisfied with the service", None);
        assert!(happy.sentiment > POLARITY_BAND, "{happy:?}");
        assert!(unhappy.sentiment < -POLARITY_BAND, "{unhappy:?}");
        let zh = classifier().classify("服务不 满意", None);
        assert!(zh.sentiment < 0.0, "{zh:?}");
    }

    #[test]
    fn safety_and_legal_threats_are_urgent() {
        assert!(classifier().classify("充电宝充电时冒烟起火了，差点烧到孩子！", None).urgent);
        assert!(classifier().classify("If this is not fixed today I will contact my lawyer and sue you.", None).urgent);
        assert!(!classifier().classify("What time does the Shanghai store open on Sunday?", None).urgent);
    }

    #[test]
    fn a_rating_moves_the_sentiment_and_says_so() {
        let c = classifier().classify("The order arrived.", Some(1));
        assert!(c.sentiment < 0.0, "{c:?}");
        assert!(c.evidence.iter().any(|e| e.term == "rating 1"), "{c:?}");
    }

    #[test]
    fn nothing_recognised_is_other_with_low_confidence() {
        let c = classifier().classify("xyzzy plugh", None);
        assert_eq!(c.category, Category::Other);
        assert_eq!(c.topic, "general");
        assert!(c.confidence <= 0.5);
    }

    #[test]
    fn polarity_band_edges() {
        assert_eq!(Polarity::of(-0.15), Polarity::Neutral);
        assert_eq!(Polarity::of(-0.151), Polarity::Negative);
        assert_eq!(Polarity::of(0.151), Polarity::Positive);
    }
}
