//! Benchmarks: each measures faultline and a baseline in the same run and prints JSON with the
//! ratio. Timings belong here, never in tests.

pub mod boot;
pub mod faults;
pub mod fc_file;
pub mod interrupt;
pub mod migrate;
pub mod restore;
pub mod slowfs;
pub mod track;

use std::time::Duration;

/// Median of `samples` in milliseconds (the upper middle for an even count).
pub fn median_ms(samples: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `a / b`, rounded to three decimals.
pub fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(median_ms(&ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(&ms(&[4, 1, 3, 2])), 3.0);
        assert!(median_ms(&[]).is_nan());
        assert_eq!(ratio(3.0, 2.0), 1.5);
    }
}
