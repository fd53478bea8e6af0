//! Deterministic data parallelism on scoped OS threads.
//!
//! Work is always cut into fixed `grain`-sized pieces whatever the thread count, and per-piece
//! results come back in order, so the output (floating-point sums included) never depends on how
//! many threads ran. Small inputs stay on the calling thread.

use std::ops::Range;
use std::sync::OnceLock;
use std::thread;

/// Below this many elements a codec runs on the calling thread: spawning costs more than it saves.
const MIN_PARALLEL: usize = 1 << 18;

/// Elements per thread at least, once parallel.
const PER_THREAD: usize = 1 << 17;

/// The default thread budget: the machine's available parallelism, at most 8.
pub(crate) fn default_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| thread::available_parallelism().map_or(1, |n| n.get()).min(8))
}

/// How many threads `elements` of work deserve under a budget of `max_threads`.
pub(crate) fn threads_for(elements: usize, max_threads: usize) -> usize {
    if elements < MIN_PARALLEL {
        1
    } else {
        max_threads.clamp(1, (elements / PER_THREAD).max(1))
    }
}

/// Calls `f(offset, piece)` for consecutive `grain`-sized pieces of `out` (`offset` is the index of
/// the piece's first element), spread over at most `threads` threads.
pub(crate) fn for_each_mut<T: Send>(
    out: &mut [T],
    grain: usize,
    threads: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let grain = grain.max(1);
    let pieces = out.len().div_ceil(grain);
    let threads = threads.clamp(1, pieces.max(1));
    let run = |base: usize, part: &mut [T]| {
        for (i, piece) in part.chunks_mut(grain).enumerate() {
            f(base + i * grain, piece);
        }
    };
    if threads == 1 {
        run(0, out);
        return;
    }
    let per_thread = pieces.div_ceil(threads) * grain;
    thread::scope(|s| {
        let mut parts = out.chunks_mut(per_thread).enumerate();
        let first = parts.next();
        for (i, part) in parts {
            let run = &run;
            s.spawn(move || run(i * per_thread, part));
        }
        if let Some((_, part)) = first {
            run(0, part);
        }
    });
}

/// Evaluates `f` on consecutive `grain`-sized ranges of `0..len` over at most `threads` threads, and
/// returns the results in range order.
pub(crate) fn map_ranges<R: Send>(
    len: usize,
    grain: usize,
    threads: usize,
    f: impl Fn(Range<usize>) -> R + Sync,
) -> Vec<R> {
    let grain = grain.max(1);
    let pieces = len.div_ceil(grain);
    let mut out: Vec<Option<R>> = (0..pieces).map(|_| None).collect();
    for_each_mut(&mut out, 1, threads.min(pieces.max(1)), |i, slot| {
        let start = i * grain;
        slot[0] = Some(f(start..(start + grain).min(len)));
    });
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_do_not_depend_on_threads() {
        let data: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
        let sums = |threads| {
            map_ranges(data.len(), 4096, threads, |r| {
                data[r].iter().map(|&x| f64::from(x)).sum::<f64>()
            })
        };
        let one = sums(1);
        assert_eq!(one.len(), 100_003usize.div_ceil(4096));
        assert_eq!(one, sums(3));
        assert_eq!(one, sums(16));

        let fill = |threads| {
            let mut out = vec![0usize; 10_001];
            for_each_mut(&mut out, 7, threads, |off, piece| {
                for (i, v) in piece.iter_mut().enumerate() {
                    *v = off + i;
                }
            });
            out
        };
        assert_eq!(fill(1), (0..10_001).collect::<Vec<_>>());
        assert_eq!(fill(1), fill(4));
        assert!(map_ranges(0, 16, 4, |r| r.len()).is_empty());
    }
}
