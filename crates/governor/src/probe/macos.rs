//! macOS: input idle time from CoreGraphics.
//!
//! `CGEventSourceSecondsSinceLastEventType(kCGEventSourceStateCombinedSessionState,
//! kCGAnyInputEventType)` is one C call and needs no extra crate. IOKit's `HIDIdleTime` (the
//! `IOHIDSystem` registry property BOINC also reads) would also work from a daemon outside the GUI
//! session; a maintainer adds it with the `io-kit-sys`/`core-foundation` crates if the governor
//! ever runs outside the user's session. Lock, fullscreen and idle inhibitors are `Unknown` here
//! (they need the CGSession dictionary and IOPMAssertion lists). This file is compiled only on
//! macOS and has not been compiled on the Linux machines that built the rest of the crate.
#![allow(unsafe_code)]

use super::{ActivityProbe, ActivitySample, Reading};

/// kCGEventSourceStateCombinedSessionState
const COMBINED_SESSION_STATE: i32 = 0;
/// kCGAnyInputEventType (~0)
const ANY_INPUT_EVENT: u32 = u32::MAX;

#[link(name = "CoreGraphics", kind = "framework")]
unsafe extern "C" {
    fn CGEventSourceSecondsSinceLastEventType(state_id: i32, event_type: u32) -> f64;
}

/// CoreGraphics input idle time.
#[derive(Debug, Default, Clone, Copy)]
pub struct MacActivityProbe;

impl ActivityProbe for MacActivityProbe {
    fn sample(&mut self) -> ActivitySample {
        // SAFETY: plain C call with two integer arguments; no pointers involved.
        let idle = unsafe { CGEventSourceSecondsSinceLastEventType(COMBINED_SESSION_STATE, ANY_INPUT_EVENT) };
        let idle_s = if idle.is_finite() && idle >= 0.0 {
            Reading::Known(idle)
        } else {
            Reading::Unknown("CoreGraphics returned no idle time")
        };
        ActivitySample {
            idle_s,
            locked: Reading::Unknown("lock state not read on macOS yet"),
            fullscreen: Reading::Unknown("fullscreen state not read on macOS yet"),
            inhibited: Reading::Unknown("power assertions not read on macOS yet"),
        }
    }
}
