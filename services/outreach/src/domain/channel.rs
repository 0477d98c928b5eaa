//! OUT-1: the outbound channels and their default cost per contact.

use crm_proto::common::v1::Channel;

/// Channels outreach can send on, with their default cost in fen (CNY minor units).
pub const OUTBOUND: &[(Channel, i64)] = &[
    (Channel::Sms, 20),
    (Channel::Email, 1),
    (Channel::AppPush, 1),
    (Channel::Wechat, 80),
    (Channel::AgentCall, 1200),
    (Channel::Community, 150),
    (Channel::InStore, 2800),
];

/// Whether outreach sends on `channel`.
pub fn is_outbound(channel: Channel) -> bool {
    OUTBOUND.iter().any(|(c, _)| *c == channel)
}

/// Channels a person carries out (an agent's call, a store visit): they become
/// agent tasks rather than adapter deliveries.
pub fn is_personal(channel: Channel) -> bool {
    matches!(channel, Channel::AgentCall | Channel::InStore)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_default_costs() {
        let cost = |c| OUTBOUND.iter().find(|(x, _)| *x == c).map(|(_, v)| *v);
        assert_eq!(cost(Channel::Sms), Some(20));
        assert_eq!(cost(Channel::Wechat), Some(80));
        assert_eq!(cost(Channel::Community), Some(150));
        assert_eq!(cost(Channel::AgentCall), Some(1200));
        assert_eq!(cost(Channel::InStore), Some(2800));
        assert!(!is_outbound(Channel::Hotline));
    }
}
