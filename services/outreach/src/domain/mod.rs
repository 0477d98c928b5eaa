//! Outreach's business rules, pure and table-tested (SPEC 4.3): the contact
//! policy ([`policy`], OUT-5), templates ([`template`], OUT-2), campaigns and
//! offers ([`campaign`], OUT-3, OUT-6), channels ([`channel`], OUT-1) and agent
//! tasks ([`task`], OUT-7).

pub mod campaign;
pub mod channel;
pub mod policy;
pub mod task;
pub mod template;
