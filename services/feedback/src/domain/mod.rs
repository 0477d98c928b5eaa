//! Feedback's business rules, pure (no I/O): classification (FBK-2), SLA
//! clocks on a business calendar and ticket states (FBK-3), surveys (FBK-5).

pub mod classify;
pub mod sla;
pub mod survey;
pub mod ticket;
