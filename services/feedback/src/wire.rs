//! Conversions between the contract's enums and the domain's (stored codes
//! are the contract's enum numbers).

use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;

use crate::domain::classify::Category;
use crate::domain::ticket::State;

/// The contract's category.
pub fn category_to_pb(c: Category) -> pb::Category {
    match c {
        Category::ProductSuggestion => pb::Category::ProductSuggestion,
        Category::ServiceComplaint => pb::Category::ServiceComplaint,
        Category::FunctionInquiry => pb::Category::FunctionInquiry,
        Category::Other => pb::Category::Other,
    }
}

/// The domain's category (None for UNSPECIFIED).
pub fn category_from_pb(c: pb::Category) -> Option<Category> {
    match c {
        pb::Category::Unspecified => None,
        pb::Category::ProductSuggestion => Some(Category::ProductSuggestion),
        pb::Category::ServiceComplaint => Some(Category::ServiceComplaint),
        pb::Category::FunctionInquiry => Some(Category::FunctionInquiry),
        pb::Category::Other => Some(Category::Other),
    }
}

/// Stored code of a category.
pub fn category_code(c: Category) -> i16 {
    category_to_pb(c) as i16
}

/// The category of a stored code.
pub fn category_of_code(code: i16) -> Category {
    pb::Category::try_from(i32::from(code)).ok().and_then(category_from_pb).unwrap_or(Category::Other)
}

/// The contract's ticket state.
pub fn state_to_pb(s: State) -> pb::TicketState {
    pb::TicketState::try_from(i32::from(s.code())).unwrap_or(pb::TicketState::Unspecified)
}

/// The domain's state (None for UNSPECIFIED or unknown numbers).
pub fn state_from_pb(s: i32) -> Option<State> {
    i16::try_from(s).ok().and_then(State::from_code)
}

/// Channels feedback comes in on (FBK-1).
pub const INTAKE_CHANNELS: &[Channel] = &[
    Channel::Hotline,
    Channel::OnlineChat,
    Channel::AppPush,
    Channel::Social,
    Channel::Wechat,
    Channel::Email,
    Channel::Survey,
    Channel::AgentVisit,
];

/// Timestamp on the wire.
pub fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// An optional timestamp on the wire.
pub fn ts_opt(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<prost_types::Timestamp> {
    t.map(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_and_states_round_trip() {
        for c in Category::ALL {
            assert_eq!(category_of_code(category_code(c)), c);
        }
        for s in State::ALL {
            assert_eq!(state_from_pb(state_to_pb(s) as i32), Some(s));
        }
        assert_eq!(state_from_pb(0), None);
        assert_eq!(state_from_pb(99), None);
    }
}
