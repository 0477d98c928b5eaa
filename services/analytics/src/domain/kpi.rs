//! KPI formulas (ANA-2..ANA-5), over the counts the rollups keep.

/// numerator / denominator, 0 when the denominator is 0.
pub fn rate(numerator: i64, denominator: i64) -> f64 {
    if denominator <= 0 { 0.0 } else { numerator as f64 / denominator as f64 }
}

/// ANA-5: NPS = % promoters (9-10) - % detractors (0-6), -100..100.
pub fn nps(promoters: i64, passives: i64, detractors: i64) -> f64 {
    let n = promoters + passives + detractors;
    if n == 0 { 0.0 } else { 100.0 * (promoters - detractors) as f64 / n as f64 }
}

/// The NPS group of a score.
pub fn nps_group(score: i32) -> &'static str {
    match score {
        9..=10 => "promoter",
        7..=8 => "passive",
        _ => "detractor",
    }
}

/// NPS of a single answer as a value (+100 promoter, 0 passive, -100 detractor), so the
/// mean of many is the NPS and a t-test applies (ANA-6).
pub fn nps_value(score: i32) -> f64 {
    match nps_group(score) {
        "promoter" => 100.0,
        "passive" => 0.0,
        _ => -100.0,
    }
}

/// ANA-3 ROI warning threshold: revenue below 3x cost.
pub const ROI_WARNING_BELOW: f64 = 3.0;

/// ANA-3: ROI = attributed revenue / cost, and whether it is below 1:3.
/// Without cost there is no ROI (0) and no warning.
pub fn roi(revenue_minor: i64, cost_minor: i64) -> (f64, bool) {
    if cost_minor <= 0 {
        return (0.0, false);
    }
    let r = revenue_minor as f64 / cost_minor as f64;
    (r, r < ROI_WARNING_BELOW)
}

/// Upper bounds (seconds) of the duration histogram's buckets: 1 s .. 60 days,
/// about 9 % apart, so a percentile read from it is within a few percent.
pub fn bucket_bounds() -> &'static [i64] {
    static BOUNDS: std::sync::OnceLock<Vec<i64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut out = Vec::new();
        let mut b = 1.0f64;
        while b < 60.0 * 86_400.0 {
            let v = b.round() as i64;
            if out.last() != Some(&v) {
                out.push(v);
            }
            b *= 1.09;
        }
        out.push(60 * 86_400);
        out
    })
}

/// The bucket of a duration (the last one catches everything longer).
pub fn bucket_of(seconds: i64) -> i32 {
    let bounds = bucket_bounds();
    bounds.partition_point(|b| *b < seconds).min(bounds.len() - 1) as i32
}

/// The q-quantile (0..1) from bucket counts, interpolated within its bucket.
pub fn percentile(counts: &[(i32, i64)], q: f64) -> f64 {
    let total: i64 = counts.iter().map(|c| c.1).sum();
    if total == 0 {
        return 0.0;
    }
    let mut sorted = counts.to_vec();
    sorted.sort();
    let bounds = bucket_bounds();
    let target = q * total as f64;
    let mut seen = 0.0;
    for (bucket, n) in sorted {
        let next = seen + n as f64;
        if next >= target {
            let i = bucket.clamp(0, bounds.len() as i32 - 1) as usize;
            let hi = bounds[i] as f64;
            let lo = if i == 0 { 0.0 } else { bounds[i - 1] as f64 };
            let within = if n == 0 { 1.0 } else { (target - seen) / n as f64 };
            return lo + (hi - lo) * within.clamp(0.0, 1.0);
        }
        seen = next;
    }
    bounds[bounds.len() - 1] as f64
}

/// ANA-2: a cohort's retention row: the share of its size active in month
/// 0, 1, 2, ... after the cohort month (`active[k]` customers in month k).
pub fn cohort_retention(active: &[i64]) -> Vec<f64> {
    let size = active.first().copied().unwrap_or(0);
    active.iter().map(|a| rate(*a, size)).collect()
}

/// ANA-2 churn in month m: customers active in m-1 and not in m, over those active in m-1.
pub fn churn_rate(active_before: i64, retained: i64) -> f64 {
    rate(active_before - retained, active_before)
}

/// ANA-4 predictive LTV (simple): average order value x orders per customer
/// per year x expected lifetime in years, the lifetime being 1 / annual churn
/// (monthly churn compounded), at most `max_years`.
pub fn predicted_ltv(
    revenue: i64,
    orders: i64,
    buyers: i64,
    observed_years: f64,
    monthly_churn: f64,
    max_years: f64,
) -> f64 {
    if orders == 0 || buyers == 0 || observed_years <= 0.0 {
        return 0.0;
    }
    let aov = revenue as f64 / orders as f64;
    let per_year = orders as f64 / buyers as f64 / observed_years;
    let annual_churn = 1.0 - (1.0 - monthly_churn.clamp(0.0, 1.0)).powi(12);
    let lifetime = if annual_churn <= 0.0 { max_years } else { (1.0 / annual_churn).min(max_years) };
    aov * per_year * lifetime
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nps_by_hand() {
        // 50 promoters, 30 passives, 20 detractors: 50 % - 20 % = 30.
        assert_eq!(nps(50, 30, 20), 30.0);
        assert_eq!(nps(0, 0, 10), -100.0);
        assert_eq!(nps(0, 0, 0), 0.0);
        assert_eq!(
            (nps_group(6), nps_group(7), nps_group(8), nps_group(9)),
            ("detractor", "passive", "passive", "promoter")
        );
        let mean = [10, 9, 8, 3].iter().map(|s| nps_value(*s)).sum::<f64>() / 4.0;
        assert_eq!(mean, nps(2, 1, 1), "the mean of answer values is the NPS");
    }

    #[test]
    fn roi_and_its_1_to_3_warning() {
        assert_eq!(roi(30_000, 10_000), (3.0, false), "exactly 1:3 is no warning");
        assert!(roi(29_999, 10_000).1);
        assert_eq!(roi(5_000, 0), (0.0, false));
    }

    #[test]
    fn cohort_retention_by_hand() {
        // 200 customers first bought in January; 80 bought again in February, 50 in March.
        assert_eq!(cohort_retention(&[200, 80, 50]), [1.0, 0.4, 0.25]);
        assert!(cohort_retention(&[]).is_empty());
        assert_eq!(churn_rate(200, 80), 0.6);
    }

    #[test]
    fn percentiles_from_the_histogram_are_close_to_the_exact_ones() {
        // 1..=1000 seconds: exact p50 500, p90 900, p99 990.
        let mut counts = std::collections::BTreeMap::new();
        for s in 1..=1000 {
            *counts.entry(bucket_of(s)).or_insert(0i64) += 1;
        }
        let counts: Vec<(i32, i64)> = counts.into_iter().collect();
        for (q, exact) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = percentile(&counts, q);
            assert!((got - exact).abs() / exact < 0.09, "q {q}: {got} vs {exact}");
        }
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(i64::MAX) as usize, bucket_bounds().len() - 1);
    }

    #[test]
    fn predicted_ltv_by_hand() {
        // AOV 100, 2 orders per buyer per year, monthly churn 5 %: annual 1-0.95^12 = 0.459640, lifetime 2.175615 y.
        let ltv = predicted_ltv(200_000, 2_000, 1_000, 1.0, 0.05, 10.0);
        assert!((ltv - 100.0 * 2.0 * 2.175_615).abs() < 0.01, "{ltv}");
        assert_eq!(predicted_ltv(0, 0, 0, 1.0, 0.05, 10.0), 0.0);
        assert_eq!(predicted_ltv(100, 1, 1, 1.0, 0.0, 10.0), 1000.0, "no churn: the lifetime cap");
    }
}
