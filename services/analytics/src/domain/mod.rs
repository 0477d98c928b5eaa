//! Analytics' rules, pure (no I/O): customer facts and their rollup
//! contributions ([`customer`]), KPI formulas ([`kpi`]) and the statistics
//! of lift and before/after comparisons ([`stats`]).

pub mod customer;
pub mod kpi;
pub mod stats;
