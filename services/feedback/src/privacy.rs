//! SEC-4: what a caller without `pii:read` sees of the customers' own words.
//! Feedback texts, survey comments and ticket notes have their phone
//! numbers, e-mails and the customer's names masked, through profiles (which
//! holds the names); a text that cannot be masked is withheld.

use crm_kit::Caller;
use crm_kit::privacy::mask_for;
use crm_proto::feedback::v1 as pb;

use crate::desk::Desk;

/// Masks the texts of feedback items.
pub async fn feedback(desk: &Desk, caller: &Caller, items: &mut [pb::Feedback]) {
    let texts = items.iter_mut().map(|f| (f.customer_id.clone(), &mut f.text)).collect();
    mask_for(caller, desk.masker.as_deref(), texts).await;
}

/// Masks the notes in tickets' histories.
pub async fn tickets(desk: &Desk, caller: &Caller, items: &mut [pb::Ticket]) {
    let texts = items
        .iter_mut()
        .flat_map(|t| {
            let customer = t.customer_id.clone();
            t.history.iter_mut().map(move |h| (customer.clone(), &mut h.note))
        })
        .collect();
    mask_for(caller, desk.masker.as_deref(), texts).await;
}

/// Masks a survey answer's comment.
pub async fn survey(desk: &Desk, caller: &Caller, r: &mut pb::SurveyResponse) {
    mask_for(caller, desk.masker.as_deref(), vec![(r.customer_id.clone(), &mut r.comment)]).await;
}

/// Masks what SubmitFeedback answers.
pub async fn submitted(desk: &Desk, caller: &Caller, r: &mut pb::SubmitFeedbackResponse) {
    feedback(desk, caller, r.feedback.as_mut().map(std::slice::from_mut).unwrap_or_default()).await;
    tickets(desk, caller, r.ticket.as_mut().map(std::slice::from_mut).unwrap_or_default()).await;
}
