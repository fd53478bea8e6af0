//! Table tests for every policy rule.

use apiary_governor::probe::{ActivitySample, GpuSample, PowerSample, SystemSample};
use apiary_governor::schedule::{Schedule, Weekday, Window};
use apiary_governor::{
    Control, Directive, Mode, PauseCause, Policy, PolicyConfig, PolicyState, Reading, Sample,
};

/// 2024-01-01 00:00 UTC, a Monday.
const MONDAY: f64 = 1_704_067_200.0;
const T: f64 = MONDAY + 12.0 * 3600.0;

fn gpu(index: u32, temp: f64, other: f64) -> GpuSample {
    GpuSample {
        temperature_c: Reading::Known(temp),
        other_utilization: Reading::Known(other),
        utilization: Reading::Known(other),
        ..GpuSample::unknown(index, "test")
    }
}

fn sample(idle_s: f64) -> Sample {
    Sample {
        taken_at: T,
        activity: ActivitySample::idle(idle_s),
        gpus: Reading::Known(vec![gpu(0, 50.0, 0.0), gpu(1, 50.0, 0.0)]),
        power: PowerSample {
            on_ac: Reading::Known(true),
            battery_percent: Reading::Known(100.0),
        },
        system: SystemSample {
            cpu_percent: Reading::Known(10.0),
            memory_used: Reading::Known(1),
            memory_total: Reading::Known(2),
            load_1m: Reading::Known(0.5),
        },
        in_flight: Reading::Known(0),
    }
}

const IN_USE: f64 = 5.0;
const AWAY: f64 = 600.0;

/// A policy whose away starts begin at once (the rule tables below; the delay has its own test).
fn policy(mode: Mode) -> Policy {
    Policy::new(PolicyConfig {
        mode,
        away_start_delay_s: 0.0,
        ..PolicyConfig::default()
    })
}

/// A policy with the default settings of `mode`.
fn defaults(mode: Mode) -> Policy {
    Policy::new(PolicyConfig {
        mode,
        ..PolicyConfig::default()
    })
}

fn level(d: &Directive) -> f64 {
    match d {
        Directive::Run { level, .. } => *level,
        other => panic!("expected Run, got {other:?}"),
    }
}

fn cause(d: &Directive) -> PauseCause {
    d.pause_cause()
        .unwrap_or_else(|| panic!("expected Paused, got {d:?}"))
}

#[test]
fn modes_and_levels_in_use_vs_away() {
    // (mode, in-use level or None = paused, away level)
    let table = [
        (Mode::Quiet, Some(0.1), 0.5),
        (Mode::Balanced, Some(0.3), 1.0),
        (Mode::Max, Some(1.0), 1.0),
        (Mode::OnlyWhenAway, None, 1.0),
    ];
    for (mode, in_use, away) in table {
        let mut p = policy(mode);
        let d = p.tick(&sample(IN_USE), T);
        match in_use {
            Some(l) => assert_eq!(level(&d), l, "{mode:?} in use: {d:?}"),
            None => {
                assert_eq!(cause(&d), PauseCause::InUse, "{mode:?}");
                assert!(d.reason().contains("120 s"), "{d:?}");
            }
        }
        assert_eq!(level(&p.tick(&sample(AWAY), T + 1.0)), away, "{mode:?} away");
        // The threshold is inclusive: exactly 120 s idle is away; 119.9 s is in use.
        assert_eq!(
            level(&p.tick(&sample(120.0), T + 2.0)),
            away,
            "{mode:?} at threshold"
        );
        let d = p.tick(&sample(119.9), T + 3.0);
        assert_eq!(
            d.duty(),
            in_use.unwrap_or(0.0),
            "{mode:?} just under threshold: {d:?}"
        );
    }
    // A custom threshold and custom Balanced levels.
    let mut p = Policy::new(PolicyConfig {
        idle_threshold_s: 60.0,
        in_use_level: 0.2,
        away_level: 0.9,
        ..PolicyConfig::default()
    });
    assert_eq!(level(&p.tick(&sample(59.0), T)), 0.2);
    assert_eq!(level(&p.tick(&sample(61.0), T + 1.0)), 0.9);
    // set_mode switches at once.
    p.set_mode(Mode::Max);
    assert_eq!(level(&p.tick(&sample(1.0), T + 2.0)), 1.0);
}

#[test]
fn locked_counts_as_away_and_inhibitor_as_in_use() {
    let mut p = policy(Mode::OnlyWhenAway);
    let mut s = sample(IN_USE);
    s.activity.locked = Reading::Known(true);
    let d = p.tick(&s, T);
    assert_eq!(level(&d), 1.0);
    assert!(d.reason().contains("locked"), "{d:?}");
    let mut s = sample(AWAY);
    s.activity.inhibited = Reading::Known(true);
    let d = p.tick(&s, T + 1.0);
    assert_eq!(cause(&d), PauseCause::InUse, "video playback counts as in use");
    let mut p = policy(Mode::Balanced);
    assert_eq!(level(&p.tick(&s, T)), 0.3);
}

#[test]
fn other_process_gpu_use_pauses_with_reason_and_cooldown() {
    let mut p = policy(Mode::Max);
    let mut s = sample(AWAY);
    // Our own use (whole-device utilization high, others' zero) never pauses.
    if let Reading::Known(g) = &mut s.gpus {
        g[0].utilization = Reading::Known(1.0);
    }
    assert_eq!(level(&p.tick(&s, T)), 1.0);
    if let Reading::Known(g) = &mut s.gpus {
        g[1].other_utilization = Reading::Known(0.45);
    }
    let d = p.tick(&s, T + 1.0);
    assert_eq!(cause(&d), PauseCause::OtherGpuUse);
    assert!(
        d.reason().contains("GPU 1") && d.reason().contains("45 %"),
        "{d:?}"
    );
    assert_eq!(d.until(), None, "still in use: no end known");
    // At the threshold (0.2) it does not pause; above it does.
    if let Reading::Known(g) = &mut s.gpus {
        g[1].other_utilization = Reading::Known(0.2);
    }
    let d = p.tick(&s, T + 2.0);
    assert_eq!(
        cause(&d),
        PauseCause::OtherGpuUse,
        "cooldown after the game stops"
    );
    assert_eq!(d.until(), Some(T + 1.0 + 30.0));
    assert!(d.reason().contains("30 s"), "{d:?}");
    assert_eq!(cause(&p.tick(&s, T + 30.9)), PauseCause::OtherGpuUse);
    assert_eq!(level(&p.tick(&s, T + 31.0)), 1.0, "resumes after the cooldown");
    // A higher threshold tolerates the same use.
    let mut p = Policy::new(PolicyConfig {
        gpu_other_threshold: 0.5,
        ..PolicyConfig::default()
    });
    if let Reading::Known(g) = &mut s.gpus {
        g[1].other_utilization = Reading::Known(0.45);
    }
    assert_eq!(level(&p.tick(&s, T)), 1.0);
}

#[test]
fn fullscreen_pauses_then_cools_down_and_can_be_disabled() {
    let mut p = policy(Mode::Balanced);
    let mut s = sample(IN_USE);
    s.activity.fullscreen = Reading::Known(true);
    let d = p.tick(&s, T);
    assert_eq!(cause(&d), PauseCause::Fullscreen);
    assert!(d.reason().contains("fullscreen"), "{d:?}");
    s.activity.fullscreen = Reading::Known(false);
    let d = p.tick(&s, T + 5.0);
    assert_eq!(cause(&d), PauseCause::Fullscreen);
    assert_eq!(d.until(), Some(T + 30.0));
    assert_eq!(level(&p.tick(&s, T + 30.0)), 0.3);
    let mut p = Policy::new(PolicyConfig {
        pause_on_fullscreen: false,
        ..PolicyConfig::default()
    });
    s.activity.fullscreen = Reading::Known(true);
    assert_eq!(level(&p.tick(&s, T)), 0.3);
}

#[test]
fn battery_rules_and_ac_back_resumes() {
    let mut p = policy(Mode::Balanced);
    let mut s = sample(AWAY);
    s.power = PowerSample {
        on_ac: Reading::Known(false),
        battery_percent: Reading::Known(80.0),
    };
    let d = p.tick(&s, T);
    assert_eq!(cause(&d), PauseCause::OnBattery);
    assert!(d.reason().contains("battery"), "{d:?}");
    s.power.on_ac = Reading::Known(true);
    assert_eq!(level(&p.tick(&s, T + 1.0)), 1.0, "AC back resumes");
    // Low battery pauses even on mains, until charged to the minimum.
    s.power.battery_percent = Reading::Known(30.0);
    let d = p.tick(&s, T + 2.0);
    assert_eq!(cause(&d), PauseCause::LowBattery);
    assert!(
        d.reason().contains("30 %") && d.reason().contains("40 %"),
        "{d:?}"
    );
    s.power.battery_percent = Reading::Known(40.0);
    assert_eq!(level(&p.tick(&s, T + 3.0)), 1.0);
    // With pause_on_battery off, battery power alone is fine but the minimum still applies.
    let mut p = Policy::new(PolicyConfig {
        pause_on_battery: false,
        ..PolicyConfig::default()
    });
    s.power = PowerSample {
        on_ac: Reading::Known(false),
        battery_percent: Reading::Known(80.0),
    };
    assert_eq!(level(&p.tick(&s, T)), 1.0);
    s.power.battery_percent = Reading::Known(39.0);
    assert_eq!(cause(&p.tick(&s, T + 1.0)), PauseCause::LowBattery);
}

/// A first-order thermal model: the GPU heats towards `ambient + gain × duty` with time constant
/// `tau`; the probe reads the temperature once a second (rounded to 1 °C, as NVML does) while
/// the policy ticks every 100 ms.
fn simulate(
    p: &mut Policy,
    temp: &mut f64,
    ambient: f64,
    gain: f64,
    seconds: f64,
    start: f64,
) -> Vec<(f64, f64)> {
    let tau = 15.0;
    let dt = 0.1;
    let mut trace = Vec::new();
    let mut reading = temp.round();
    let mut t = 0.0;
    while t < seconds {
        if (t % 1.0) < dt / 2.0 {
            reading = temp.round();
        }
        let mut s = sample(AWAY);
        s.gpus = Reading::Known(vec![gpu(0, reading, 0.0)]);
        let d = p.tick(&s, start + t);
        assert!(!d.reason().is_empty());
        let duty = d.duty();
        *temp += (ambient + gain * duty - *temp) / tau * dt;
        trace.push((*temp, duty));
        t += dt;
    }
    trace
}

#[test]
fn temperature_controller_paces_down_and_back_up() {
    let mut p = policy(Mode::Max);
    // Full duty would heat to 35 + 60 = 95 °C; the target is 80 °C, reached at duty 0.75.
    let mut temp = 40.0;
    let trace = simulate(&mut p, &mut temp, 35.0, 60.0, 600.0, T);
    let peak = trace.iter().map(|(t, _)| *t).fold(0.0, f64::max);
    let tail = &trace[trace.len() - 600..];
    let mean_t = tail.iter().map(|(t, _)| t).sum::<f64>() / tail.len() as f64;
    let mean_d = tail.iter().map(|(_, d)| d).sum::<f64>() / tail.len() as f64;
    println!("thermal: peak {peak:.1} °C, last minute mean {mean_t:.2} °C at duty {mean_d:.3}");
    assert!((mean_t - 80.0).abs() < 1.0, "settles near the target: {mean_t}");
    assert!((mean_d - 0.75).abs() < 0.05, "duty settles near 0.75: {mean_d}");
    assert!(peak < 86.0, "overshoot bounded: {peak}");
    let mut s = sample(AWAY);
    s.gpus = Reading::Known(vec![gpu(0, 82.0, 0.0)]);
    let d = p.tick(&s, T + 600.0);
    assert!(matches!(d, Directive::Pace { .. }), "{d:?}");
    assert!(
        d.reason().contains("80 °C") && d.reason().contains("82 °C"),
        "{d:?}"
    );
    // A cooler room: full duty now only reaches 70 °C, so the controller lets go.
    let trace = simulate(&mut p, &mut temp, 10.0, 60.0, 300.0, T + 601.0);
    let (last_t, last_d) = trace[trace.len() - 1];
    println!("thermal after cooling: {last_t:.1} °C at duty {last_d:.2}");
    assert_eq!(last_d, 1.0);
    assert!(p.tick(&sample(AWAY), T + 1000.0).is_run());
    // Hotter than the target by far: duty 0, still loaded (Pace, not Paused).
    let mut p = policy(Mode::Max);
    let mut s = sample(AWAY);
    s.gpus = Reading::Known(vec![gpu(0, 101.0, 0.0)]);
    let d = p.tick(&s, T);
    assert_eq!(d.duty(), 0.0, "{d:?}");
    assert!(
        matches!(d, Directive::Pace { .. }) && d.reason().contains("cool"),
        "{d:?}"
    );
}

fn evenings() -> Schedule {
    Schedule {
        utc_offset_minutes: 60,
        windows: vec![Window {
            days: Weekday::ALL.to_vec(),
            start_minute: 18 * 60,
            end_minute: 23 * 60,
        }],
    }
}

#[test]
fn schedule_pauses_outside_windows_with_until() {
    let mut p = Policy::new(PolicyConfig {
        schedule: Some(evenings()),
        ..PolicyConfig::default()
    });
    // Monday 13:00 local (12:00 UTC): outside; next window at 18:00 local = 17:00 UTC.
    let d = p.tick(&sample(AWAY), T);
    assert_eq!(cause(&d), PauseCause::Schedule);
    assert_eq!(d.until(), Some(MONDAY + 17.0 * 3600.0));
    // Monday 19:00 local: inside; runs until 23:00 local = 22:00 UTC.
    let d = p.tick(&sample(AWAY), MONDAY + 18.0 * 3600.0);
    assert_eq!(level(&d), 1.0);
    assert_eq!(d.until(), Some(MONDAY + 22.0 * 3600.0));
    // A manual start ignores the schedule.
    p.resume_manual(None);
    assert_eq!(level(&p.tick(&sample(AWAY), T)), 1.0);
}

#[test]
fn snooze_survives_serialize_and_restore() {
    let mut p = policy(Mode::Balanced);
    p.snooze(T + 3600.0);
    let d = p.tick(&sample(AWAY), T);
    assert_eq!(cause(&d), PauseCause::Snoozed);
    assert_eq!(d.until(), Some(T + 3600.0));
    let saved = serde_json::to_string(&p.state()).unwrap();
    let state: PolicyState = serde_json::from_str(&saved).unwrap();
    assert_eq!(
        state.control,
        Control::Paused {
            until: Some(T + 3600.0),
            finished: false
        }
    );
    let mut restarted = Policy::with_state(PolicyConfig::default(), state);
    assert_eq!(
        cause(&restarted.tick(&sample(AWAY), T + 10.0)),
        PauseCause::Snoozed
    );
    let mut other = policy(Mode::Balanced);
    other.restore(state);
    assert_eq!(cause(&other.tick(&sample(AWAY), T + 3599.0)), PauseCause::Snoozed);
    // The snooze ends by itself.
    assert_eq!(level(&restarted.tick(&sample(AWAY), T + 3600.0)), 1.0);
    assert_eq!(restarted.state().control, Control::Auto);
    // Even the snooze overrides a manual start, and a manual pause has no end.
    restarted.pause_manual();
    let d = restarted.tick(&sample(AWAY), T + 9e6);
    assert_eq!((cause(&d), d.until()), (PauseCause::User, None));
    restarted.resume_auto();
    assert!(restarted.tick(&sample(AWAY), T + 9e6).is_run());
}

#[test]
fn finish_then_pause_drains_then_pauses() {
    let mut p = policy(Mode::Balanced);
    p.finish_then_pause(T);
    let mut s = sample(AWAY);
    s.in_flight = Reading::Known(3);
    let d = p.tick(&s, T);
    assert!(matches!(d, Directive::Drain { .. }), "{d:?}");
    assert_eq!(d.until(), Some(T + 300.0));
    assert_eq!(d.duty(), 0.0);
    s.in_flight = Reading::Known(0);
    let d = p.tick(&s, T + 1.0);
    assert_eq!(cause(&d), PauseCause::Finished);
    // It stays paused until you resume.
    assert_eq!(cause(&p.tick(&s, T + 1e5)), PauseCause::Finished);
    assert_eq!(
        p.state().control,
        Control::Paused {
            until: None,
            finished: true
        }
    );
    p.resume_manual(None);
    assert!(p.tick(&s, T + 1e5).is_run());
    // Without in-flight reports the drain ends at the timeout.
    let mut p = policy(Mode::Balanced);
    p.finish_then_pause(T);
    let mut s = sample(AWAY);
    s.in_flight = Reading::Unknown("no engine");
    assert!(matches!(p.tick(&s, T + 299.0), Directive::Drain { .. }));
    assert_eq!(cause(&p.tick(&s, T + 300.0)), PauseCause::Finished);
}

#[test]
fn manual_start_wins_over_availability_rules_only() {
    let mut p = policy(Mode::OnlyWhenAway);
    assert_eq!(cause(&p.tick(&sample(IN_USE), T)), PauseCause::InUse);
    p.resume_manual(Some(T + 3600.0));
    let d = p.tick(&sample(IN_USE), T + 1.0);
    assert_eq!(
        level(&d),
        0.3,
        "manual start while in use runs at manual_in_use_level"
    );
    assert!(d.reason().contains("Started by you"), "{d:?}");
    assert_eq!(d.until(), Some(T + 3600.0));
    // Unknown idle does not stop a manual start either.
    let mut s = sample(IN_USE);
    s.activity = ActivitySample::unknown("no idle source");
    assert!(p.tick(&s, T + 2.0).is_run());
    // Away: the away level.
    assert_eq!(level(&p.tick(&sample(AWAY), T + 3.0)), 1.0);
    // Protection rules still stop manual work.
    let mut s = sample(IN_USE);
    s.activity.fullscreen = Reading::Known(true);
    assert_eq!(cause(&p.tick(&s, T + 4.0)), PauseCause::Fullscreen);
    let mut s = sample(IN_USE);
    s.power.on_ac = Reading::Known(false);
    assert_eq!(cause(&p.tick(&s, T + 100.0)), PauseCause::OnBattery);
    // In Balanced a manual start keeps the in-use throttle.
    let mut b = policy(Mode::Balanced);
    b.resume_manual(None);
    assert_eq!(level(&b.tick(&sample(IN_USE), T)), 0.3);
    // The manual start expires: automatic control pauses again.
    assert_eq!(cause(&p.tick(&sample(IN_USE), T + 3600.0)), PauseCause::InUse);
    assert_eq!(p.state().control, Control::Auto);
}

#[test]
fn unknown_readings_behave_as_documented() {
    let unknown = Sample::unknown(T);
    let mut p = policy(Mode::Balanced);
    let d = p.tick(&unknown, T);
    assert_eq!(level(&d), 0.3, "unknown idle counts as in use: {d:?}");
    assert!(d.reason().contains("unknown"), "{d:?}");
    assert_eq!(level(&policy(Mode::Max).tick(&unknown, T)), 1.0);
    assert_eq!(level(&policy(Mode::Quiet).tick(&unknown, T)), 0.1);
    let d = policy(Mode::OnlyWhenAway).tick(&unknown, T);
    assert_eq!(cause(&d), PauseCause::IdleUnknown);
    assert!(d.reason().contains("Cannot tell whether you are away"), "{d:?}");
    // Known idle, everything else unknown: no pause.
    let mut s = Sample::unknown(T);
    s.activity.idle_s = Reading::Known(AWAY);
    assert_eq!(level(&policy(Mode::OnlyWhenAway).tick(&s, T)), 1.0);
}

#[test]
fn every_directive_has_a_reason() {
    let mut seen = std::collections::HashSet::new();
    for mode in [Mode::Quiet, Mode::Balanced, Mode::Max, Mode::OnlyWhenAway] {
        for control in 0..5 {
            for variant in 0..8 {
                let mut p = Policy::new(PolicyConfig {
                    mode,
                    schedule: Some(evenings()),
                    ..PolicyConfig::default()
                });
                match control {
                    1 => p.snooze(T + 60.0),
                    2 => p.pause_manual(),
                    3 => p.resume_manual(None),
                    4 => p.finish_then_pause(T),
                    _ => {}
                }
                let mut s = sample(if variant % 2 == 0 { IN_USE } else { AWAY });
                s.in_flight = Reading::Known(1);
                match variant / 2 {
                    1 => s.activity.fullscreen = Reading::Known(true),
                    2 => s.power.on_ac = Reading::Known(false),
                    3 => s = Sample::unknown(T),
                    _ => {}
                }
                for now in [T, MONDAY + 18.0 * 3600.0] {
                    let d = p.tick(&s, now);
                    assert!(!d.reason().trim().is_empty(), "{d:?}");
                    seen.insert(std::mem::discriminant(&d));
                }
            }
        }
    }
    assert!(!Directive::starting().reason().is_empty());
    assert_eq!(seen.len(), 3, "Run, Drain and Paused were all produced");
}

#[test]
fn config_defaults_and_serde() {
    let c: PolicyConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, PolicyConfig::default());
    assert_eq!(c.mode, Mode::Balanced);
    assert_eq!(
        (c.idle_threshold_s, c.in_use_level, c.away_level),
        (120.0, 0.3, 1.0)
    );
    assert_eq!(
        (
            c.gpu_other_threshold,
            c.min_battery_percent,
            c.temperature_target_c
        ),
        (0.2, 40.0, 80.0)
    );
    assert!(c.pause_on_fullscreen && c.pause_on_battery && c.schedule.is_none());
    let c: PolicyConfig = serde_json::from_str(r#"{"mode":"only_when_away","schedule":{"utc_offset_minutes":60,"windows":[{"days":["sat","sun"],"start_minute":0,"end_minute":0}]}}"#).unwrap();
    assert_eq!(c.mode, Mode::OnlyWhenAway);
    assert_eq!(
        c.schedule.as_ref().unwrap().windows[0].days,
        vec![Weekday::Sat, Weekday::Sun]
    );
    let back: PolicyConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let d = Directive::Paused {
        cause: PauseCause::Snoozed,
        reason: "Snoozed by you".into(),
        until: Some(T),
    };
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["kind"], "paused");
    assert_eq!(json["cause"], "snoozed");
}

#[test]
fn a_selected_gpu_is_the_only_one_the_gpu_rules_watch() {
    let mut s = sample(AWAY);
    if let Reading::Known(g) = &mut s.gpus {
        // another program on GPU 1, which is also hot
        g[1].other_utilization = Reading::Known(0.9);
        g[1].temperature_c = Reading::Known(99.0);
    }
    // every GPU counts by default
    let mut p = policy(Mode::Max);
    assert_eq!(p.gpu(), None);
    assert_eq!(cause(&p.tick(&s, T)), PauseCause::OtherGpuUse);
    // computing on GPU 0: GPU 1's use and heat are someone else's business
    let mut p = policy(Mode::Max);
    p.set_gpu(Some(0));
    assert_eq!(p.gpu(), Some(0));
    for i in 0..30 {
        let d = p.tick(&s, T + f64::from(i));
        assert_eq!(level(&d), 1.0, "{d:?}");
    }
    // computing on GPU 1: it pauses, naming GPU 1
    p.set_gpu(Some(1));
    let d = p.tick(&s, T + 31.0);
    assert_eq!(cause(&d), PauseCause::OtherGpuUse);
    assert!(d.reason().contains("GPU 1"), "{d:?}");
    // back to GPU 0: the cooldown of GPU 1 is dropped with the selection
    p.set_gpu(Some(0));
    assert!(matches!(
        p.tick(&s, T + 32.0),
        Directive::Run { .. } | Directive::Pace { .. }
    ));
}

#[test]
fn an_away_start_waits_its_delay_and_can_be_cancelled() {
    let mut p = defaults(Mode::OnlyWhenAway);
    assert_eq!(p.config().away_start_delay_s, 10.0);
    assert_eq!(cause(&p.tick(&sample(IN_USE), T)), PauseCause::InUse);
    assert!(!p.cancel_away_start(), "nothing to cancel while you use the PC");
    // Away: the start is announced with its time, and does not begin before it.
    let d = p.tick(&sample(AWAY), T + 1.0);
    assert_eq!(cause(&d), PauseCause::StartingSoon);
    assert_eq!(d.reason(), "Starting in 10 s because you are away");
    assert_eq!(d.until(), Some(T + 11.0));
    assert_eq!(
        p.tick(&sample(AWAY), T + 10.9),
        d,
        "the same directive while it waits"
    );
    assert_eq!(level(&p.tick(&sample(AWAY), T + 11.0)), 1.0);
    // Back at the PC: paused again; away again: a new delay.
    assert_eq!(cause(&p.tick(&sample(IN_USE), T + 20.0)), PauseCause::InUse);
    let d = p.tick(&sample(AWAY), T + 30.0);
    assert_eq!((cause(&d), d.until()), (PauseCause::StartingSoon, Some(T + 40.0)));
    // Cancel: stays paused for the rest of this time away, however long.
    assert!(p.cancel_away_start());
    assert!(!p.cancel_away_start(), "already cancelled");
    let d = p.tick(&sample(AWAY), T + 31.0);
    assert_eq!(cause(&d), PauseCause::StartCancelled);
    assert!(d.reason().contains("cancelled"), "{d:?}");
    assert_eq!(
        cause(&p.tick(&sample(AWAY), T + 3600.0)),
        PauseCause::StartCancelled
    );
    // The next time away starts after the delay again.
    assert_eq!(cause(&p.tick(&sample(IN_USE), T + 3601.0)), PauseCause::InUse);
    assert_eq!(
        cause(&p.tick(&sample(AWAY), T + 3700.0)),
        PauseCause::StartingSoon
    );
    assert!(p.tick(&sample(AWAY), T + 3710.0).is_run());
    // Cancelling work an away start began stops it too.
    assert!(p.cancel_away_start());
    assert_eq!(
        cause(&p.tick(&sample(AWAY), T + 3711.0)),
        PauseCause::StartCancelled
    );
    // A locked screen counts as away.
    let mut locked = sample(IN_USE);
    locked.activity.locked = Reading::Known(true);
    let mut q = defaults(Mode::OnlyWhenAway);
    let d = q.tick(&locked, T);
    assert_eq!(d.reason(), "Starting in 10 s because the screen is locked");
    // Where work runs while you use the PC, being away only raises the level: no delay.
    assert_eq!(level(&defaults(Mode::Balanced).tick(&sample(AWAY), T)), 1.0);
    // A delay of 0 starts at once; a manual start never waits.
    assert_eq!(level(&policy(Mode::OnlyWhenAway).tick(&sample(AWAY), T)), 1.0);
    let mut manual = defaults(Mode::OnlyWhenAway);
    manual.resume_manual(None);
    assert_eq!(level(&manual.tick(&sample(AWAY), T)), 1.0);
}
