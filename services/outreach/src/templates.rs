//! OUT-2 template storage: the wire bodies parsed once, with field errors.

use crm_kit::{ApiError, FieldViolations};
use crm_proto::outreach::v1 as pb;

use crate::domain::template::{self, Body, Text};

/// Longest subject accepted.
pub const MAX_SUBJECT: usize = 200;

/// Parses the bodies of a template; errors name `field[i].body` etc.
pub fn parse_bodies(bodies: &[pb::TemplateBody], field: &str) -> Result<Vec<Body>, ApiError> {
    let mut v = FieldViolations::new();
    if bodies.is_empty() {
        v.add(field, "at least one locale's body is required (zh-CN and en expected)");
    }
    if bodies.len() > template::LOCALES.len() {
        v.add(field, format!("at most one body per locale ({})", template::LOCALES.join(", ")));
    }
    let mut out = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        let f = |name: &str| format!("{field}[{i}].{name}");
        if !template::LOCALES.contains(&b.locale.as_str()) {
            v.add(f("locale"), format!("must be one of {}", template::LOCALES.join(", ")));
        } else if bodies[..i].iter().any(|o| o.locale == b.locale) {
            v.add(f("locale"), "appears twice");
        }
        if b.body.trim().is_empty() {
            v.add(f("body"), "is required");
        } else if b.body.len() > template::MAX_BODY {
            v.add(f("body"), format!("is longer than {} bytes", template::MAX_BODY));
        }
        if b.subject.len() > MAX_SUBJECT {
            v.add(f("subject"), format!("is longer than {MAX_SUBJECT} bytes"));
        }
        let subject = v.check(&f("subject"), Text::parse(&b.subject));
        let body = v.check(&f("body"), Text::parse(&b.body));
        if let (Some(subject), Some(body)) = (subject, body) {
            out.push(Body { locale: b.locale.clone(), subject, body });
        }
    }
    v.into_result()?;
    Ok(out)
}

/// Stores a checked template as version `version`, filling in its id,
/// variables and etag; without `replace` an existing template is kept.
pub async fn save(
    conn: &mut sqlx::PgConnection,
    id: uuid::Uuid,
    t: &mut pb::Template,
    bodies: &[Body],
    version: i64,
    replace: bool,
) -> Result<(), ApiError> {
    use prost::Message;
    t.template_id = id.to_string();
    t.variables = template::variables_of(bodies);
    t.etag = format!("v{version}");
    let sql = if replace {
        "INSERT INTO templates (template_id, display_name, channel, content_type, purpose, bodies, version) VALUES ($1,$2,$3,$4,$5,$6,$7) \
         ON CONFLICT (template_id) DO UPDATE SET display_name = $2, channel = $3, content_type = $4, purpose = $5, bodies = $6, version = $7"
    } else {
        "INSERT INTO templates (template_id, display_name, channel, content_type, purpose, bodies, version) VALUES ($1,$2,$3,$4,$5,$6,$7) \
         ON CONFLICT DO NOTHING"
    };
    sqlx::query(sql)
        .bind(id)
        .bind(&t.display_name)
        .bind(t.channel as i16)
        .bind(t.content_type as i16)
        .bind(t.purpose as i16)
        .bind(t.encode_to_vec())
        .bind(version)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Writes the system templates the code refers to (OUT-4: the feedback
/// acknowledgement and the resolution check) unless they exist; editable
/// afterwards like any other.
pub async fn seed(pool: &sqlx::PgPool) -> Result<(), ApiError> {
    let body = |locale: &str, subject: &str, text: &str| pb::TemplateBody {
        locale: locale.into(),
        subject: subject.into(),
        body: text.into(),
    };
    let ack = pb::Template {
        template_id: String::new(),
        display_name: "Feedback acknowledgement".into(),
        channel: crm_proto::common::v1::Channel::Sms as i32,
        content_type: pb::ContentType::Service as i32,
        purpose: crm_proto::common::v1::Purpose::Service as i32,
        bodies: vec![
            body(
                "zh-CN",
                "我们已收到您的反馈",
                "{{name}}，您好！我们已收到您的反馈（编号 {{feedback_id}}），将尽快处理。",
            ),
            body(
                "en",
                "We received your feedback",
                "{{name}}, thank you: we received your feedback ({{feedback_id}}) and will get back to you soon.",
            ),
        ],
        variables: vec!["feedback_id".into(), "name".into()],
        etag: String::new(),
    };
    let verify = pb::Template {
        template_id: String::new(),
        display_name: "Feedback resolution check".into(),
        channel: crm_proto::common::v1::Channel::Sms as i32,
        content_type: pb::ContentType::Service as i32,
        purpose: crm_proto::common::v1::Purpose::Service as i32,
        bodies: vec![
            body(
                "zh-CN",
                "您反馈的问题已处理",
                "{{name}}，您好！您反馈的问题（工单 {{ticket_id}}）已处理完毕。问题解决了吗？请回复确认，未解决我们会继续跟进。",
            ),
            body(
                "en",
                "Your issue was resolved",
                "{{name}}, we have resolved the issue you raised (ticket {{ticket_id}}). Is it sorted? Please reply to confirm; if not, we will keep working on it.",
            ),
        ],
        variables: vec!["name".into(), "ticket_id".into()],
        etag: String::new(),
    };
    let mut system = vec![(crate::api::ACK_TEMPLATE, ack), (crate::api::VERIFY_TEMPLATE, verify)];
    for t in crate::triggers::ALL {
        let (name, zh, en) = t.texts;
        system.push((
            t.template,
            pb::Template {
                template_id: String::new(),
                display_name: name.into(),
                channel: crm_proto::common::v1::Channel::Sms as i32,
                content_type: if t.purpose == crm_proto::common::v1::Purpose::Service {
                    pb::ContentType::Service as i32
                } else {
                    pb::ContentType::BenefitMatch as i32
                },
                purpose: t.purpose as i32,
                bodies: vec![body("zh-CN", "", zh), body("en", "", en)],
                variables: Vec::new(),
                etag: String::new(),
            },
        ));
    }
    let mut conn = pool.acquire().await?;
    for (id, mut t) in system {
        let parsed = parse_bodies(&t.bodies, "bodies")?;
        save(&mut conn, id, &mut t, &parsed, 1, false).await?;
    }
    Ok(())
}
