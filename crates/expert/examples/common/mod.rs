//! Shared by the examples: timing.

use std::time::Instant;

use anyhow::Result;

/// Runs `f` `iters` times; returns the fastest and the median time in milliseconds.
pub fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok((t[0], t[t.len() / 2]))
}
