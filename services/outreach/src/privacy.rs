//! SEC-4, SEC-5: outreach's free text and what a caller without `pii:read`
//! sees of it. Task notes (the customer's feedback, the problem found, the
//! next action, the reason) are masked through profiles, which holds the
//! names, and withheld when they cannot be; a message's last error (a relay
//! may echo the address it refused) has its phone numbers and e-mails
//! masked. Events carry none of this text.

use crm_kit::Caller;
use crm_kit::privacy::{TextMasker, mask_for, mask_text};
use crm_proto::outreach::v1 as pb;

/// Masks the free text of tasks.
pub async fn tasks(masker: Option<&dyn TextMasker>, caller: &Caller, tasks: &mut [pb::Task]) {
    let texts = tasks
        .iter_mut()
        .flat_map(|t| {
            let customer = t.customer_id.clone();
            [&mut t.reason, &mut t.customer_feedback, &mut t.problem, &mut t.next_action]
                .into_iter()
                .map(move |text| (customer.clone(), text))
        })
        .collect();
    mask_for(caller, masker, texts).await;
}

/// Masks the last errors of messages (no names there: relays echo addresses).
pub fn messages(caller: &Caller, messages: &mut [pb::Message]) {
    if caller.can_read_pii() {
        return;
    }
    for m in messages {
        m.last_error = mask_text(&m.last_error, &[]);
    }
}

/// A message as events carry it: without its last error.
pub fn message_event(m: pb::Message) -> pb::Message {
    pb::Message { last_error: String::new(), ..m }
}

/// A task as events carry it: without its free text.
pub fn task_event(t: pb::Task) -> pb::Task {
    pb::Task {
        reason: String::new(),
        customer_feedback: String::new(),
        problem: String::new(),
        next_action: String::new(),
        ..t
    }
}
