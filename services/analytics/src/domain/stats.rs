//! The statistics behind lift (ANA-3) and before/after comparisons (ANA-6):
//! the normal and Student t distributions, the two-proportion test and
//! Welch's t-test. Pure functions, checked against published values.

/// Standard normal CDF Φ(x), via erfc (absolute error below 1e-7).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, fractional error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal quantile Φ⁻¹(p) (Acklam's algorithm, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -39.696_830_286_653_76,
        220.946_098_424_520_5,
        -275.928_510_446_968_7,
        138.357_751_867_269,
        -30.664_798_066_147_16,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -54.476_098_798_224_06,
        161.585_836_858_040_9,
        -155.698_979_859_886_6,
        66.801_311_887_719_72,
        -13.280_681_552_885_72,
    ];
    const C: [f64; 6] = [
        -0.007_784_894_002_430_293,
        -0.322_396_458_041_136_4,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [0.007_784_695_709_041_462, 0.322_467_129_070_039_8, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let low = 0.024_25;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// ln Γ(x) (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularised incomplete beta I_x(a, b) by Lentz's continued fraction.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - incomplete_beta(b, a, 1.0 - x);
    }
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut f = d;
    for m in 1..300 {
        let m = m as f64;
        for step in 0..2 {
            let num = if step == 0 {
                m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))
            } else {
                -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))
            };
            d = 1.0 + num * d;
            if d.abs() < tiny {
                d = tiny;
            }
            c = 1.0 + num / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-14 {
            break;
        }
    }
    front * f / a
}

/// Student t CDF with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if !df.is_finite() || df > 1e7 {
        return normal_cdf(t);
    }
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, x);
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// Student t quantile (bisection on the CDF).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Result of comparing two groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Estimate of group 1 (treated / after).
    pub estimate1: f64,
    /// Estimate of group 2 (control / before).
    pub estimate2: f64,
    /// estimate1 - estimate2.
    pub difference: f64,
    /// Confidence interval of the difference.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// p-value below 1 - level.
    pub significant: bool,
}

/// Two-proportion z-test of x1/n1 against x2/n2 (ANA-3): the interval is the
/// unpooled (Wald) interval of the difference, the p-value from the pooled
/// z statistic. With an empty group nothing is significant.
pub fn two_proportions(x1: u64, n1: u64, x2: u64, n2: u64, level: f64) -> Comparison {
    let rate = |x: u64, n: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    let (p1, p2) = (rate(x1, n1), rate(x2, n2));
    let diff = p1 - p2;
    if n1 == 0 || n2 == 0 {
        return Comparison {
            estimate1: p1,
            estimate2: p2,
            difference: diff,
            low: f64::NAN,
            high: f64::NAN,
            p_value: 1.0,
            significant: false,
        };
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let z = normal_quantile(0.5 + level / 2.0);
    let se = (p1 * (1.0 - p1) / n1f + p2 * (1.0 - p2) / n2f).sqrt();
    let pooled = (x1 + x2) as f64 / (n1f + n2f);
    let se0 = (pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f)).sqrt();
    let p_value = if se0 == 0.0 { 1.0 } else { 2.0 * (1.0 - normal_cdf((diff / se0).abs())) };
    Comparison {
        estimate1: p1,
        estimate2: p2,
        difference: diff,
        low: diff - z * se,
        high: diff + z * se,
        p_value: p_value.clamp(0.0, 1.0),
        significant: p_value < 1.0 - level,
    }
}

/// Summary of a sample for Welch's test: n, sum and sum of squares.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Observations.
    pub n: f64,
    /// Sum.
    pub sum: f64,
    /// Sum of squares.
    pub sum_sq: f64,
}

impl Sample {
    /// From raw values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Sample {
        values.into_iter().fold(Sample::default(), |s, v| Sample {
            n: s.n + 1.0,
            sum: s.sum + v,
            sum_sq: s.sum_sq + v * v,
        })
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.n == 0.0 { 0.0 } else { self.sum / self.n }
    }

    /// Unbiased variance (0 below two observations).
    pub fn variance(&self) -> f64 {
        if self.n < 2.0 { 0.0 } else { ((self.sum_sq - self.sum * self.sum / self.n) / (self.n - 1.0)).max(0.0) }
    }
}

/// Welch's t-test of mean(a) - mean(b) (ANA-6, for averages such as CSAT or spend).
pub fn welch(a: Sample, b: Sample, level: f64) -> Comparison {
    let (m1, m2) = (a.mean(), b.mean());
    let diff = m1 - m2;
    if a.n < 2.0 || b.n < 2.0 {
        return Comparison {
            estimate1: m1,
            estimate2: m2,
            difference: diff,
            low: f64::NAN,
            high: f64::NAN,
            p_value: 1.0,
            significant: false,
        };
    }
    let (v1, v2) = (a.variance() / a.n, b.variance() / b.n);
    let se = (v1 + v2).sqrt();
    if se == 0.0 {
        let p = if diff == 0.0 { 1.0 } else { 0.0 };
        return Comparison {
            estimate1: m1,
            estimate2: m2,
            difference: diff,
            low: diff,
            high: diff,
            p_value: p,
            significant: p < 1.0 - level,
        };
    }
    let df = (v1 + v2).powi(2) / (v1 * v1 / (a.n - 1.0) + v2 * v2 / (b.n - 1.0));
    let t = diff / se;
    let p_value = (2.0 * (1.0 - t_cdf(t.abs(), df))).clamp(0.0, 1.0);
    let q = t_quantile(0.5 + level / 2.0, df);
    Comparison {
        estimate1: m1,
        estimate2: m2,
        difference: diff,
        low: diff - q * se,
        high: diff + q * se,
        p_value,
        significant: p_value < 1.0 - level,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn the_normal_distribution_matches_its_tables() {
        assert!(close(normal_cdf(0.0), 0.5, 1e-7));
        assert!(close(normal_cdf(1.96), 0.975_002, 1e-6));
        assert!(close(normal_cdf(-1.0), 0.158_655, 1e-6));
        assert!(close(normal_quantile(0.975), 1.959_964, 1e-6));
        assert!(close(normal_quantile(0.95), 1.644_854, 1e-6));
        assert!(close(normal_quantile(0.005), -2.575_829, 1e-6));
    }

    #[test]
    fn the_t_distribution_matches_its_tables() {
        // t(0.975; 10) = 2.228139, t(0.975; 30) = 2.042272; P(T <= 2 | df 5) = 0.949030.
        assert!(close(t_quantile(0.975, 10.0), 2.228_139, 1e-5));
        assert!(close(t_quantile(0.975, 30.0), 2.042_272, 1e-5));
        assert!(close(t_cdf(2.0, 5.0), 0.949_030, 1e-5));
        assert!(close(t_cdf(-2.0, 5.0), 0.050_970, 1e-5));
    }

    #[test]
    fn lift_against_a_holdout_by_hand() {
        // Treated 120 of 1 000 converted, holdout 80 of 1 000.
        // diff 0.04; se = sqrt(.12*.88/1000 + .08*.92/1000) = sqrt(0.0001792) = 0.0133866; 95 %: 0.04 ± 1.959964*0.0133866.
        // pooled p = 0.1, se0 = sqrt(.1*.9*(2/1000)) = 0.013416, z = 2.98142, p = 0.002869.
        let c = two_proportions(120, 1000, 80, 1000, 0.95);
        assert!(close(c.difference, 0.04, 1e-12));
        assert!(close(c.low, 0.04 - 1.959_964 * 0.013_386_6, 1e-5), "{c:?}");
        assert!(close(c.high, 0.04 + 1.959_964 * 0.013_386_6, 1e-5), "{c:?}");
        assert!(close(c.p_value, 0.002_869, 2e-5), "{c:?}");
        assert!(c.significant);
    }

    #[test]
    fn a_small_difference_on_small_groups_is_not_significant() {
        let c = two_proportions(6, 50, 5, 50, 0.95);
        assert!(!c.significant);
        assert!(c.low < 0.0 && c.high > 0.0);
        let empty = two_proportions(3, 10, 0, 0, 0.95);
        assert!(!empty.significant && empty.p_value == 1.0);
    }

    #[test]
    fn welch_by_hand() {
        // a = 1..=5 (mean 3, var 2.5), b = 2,4,6,8,10 (mean 6, var 10).
        // se = sqrt(0.5 + 2) = 1.581139; t = -1.897367; df = 6.25/(0.0625 + 1) = 5.882353.
        let a = Sample::of([1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = Sample::of([2.0, 4.0, 6.0, 8.0, 10.0]);
        assert!(close(a.variance(), 2.5, 1e-12) && close(b.variance(), 10.0, 1e-12));
        let c = welch(a, b, 0.95);
        assert!(close(c.difference, -3.0, 1e-12));
        // Two-sided p for t = -1.8974 with 5.88 df is about 0.1075.
        assert!(close(c.p_value, 0.1075, 2e-3), "{c:?}");
        assert!(!c.significant);
    }
}
