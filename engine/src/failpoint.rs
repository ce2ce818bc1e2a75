//! Named points in mutating operations where tests make plinth fail on purpose.
//!
//! Unit tests arm a point for the current thread ([`arm`]): the next `times` passes fail with an
//! INTERNAL error, so every failure path can be driven without root or a broken disk. Builds with
//! the `failpoints` feature also read `PLINTH_FAILPOINT=<name>` at each pass and abort the whole
//! process there (a crash, not an error), for the crash-at-every-step tests, or with
//! `<name>=sleep:<ms>` hold still there (a race made deterministic). Other builds compile every
//! point to nothing.

use crate::error::{Error, Result};

#[cfg(any(test, feature = "failpoints"))]
mod armed {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        static ARMED: RefCell<HashMap<&'static str, usize>> = RefCell::new(HashMap::new());
    }

    pub fn arm(name: &'static str, times: usize) {
        ARMED.with(|armed| armed.borrow_mut().insert(name, times));
    }

    pub fn take(name: &'static str) -> bool {
        ARMED.with(|armed| match armed.borrow_mut().get_mut(name) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
    }
}

/// Makes the next `times` passes of `name` on this thread fail.
#[cfg(any(test, feature = "failpoints"))]
pub fn arm(name: &'static str, times: usize) {
    armed::arm(name, times);
}

/// A point in an operation; fails only when a test armed it.
#[inline(always)]
pub fn check(name: &'static str) -> Result<()> {
    #[cfg(feature = "failpoints")]
    if let Ok(wanted) = std::env::var("PLINTH_FAILPOINT") {
        match wanted.split_once('=') {
            None if wanted == name => {
                eprintln!("failpoint {name}: aborting");
                std::process::abort();
            }
            // `<name>=sleep:<ms>`: hold still there, so a test can change the world meanwhile.
            Some((point, action)) if point == name => {
                if let Some(ms) = action.strip_prefix("sleep:").and_then(|ms| ms.parse().ok()) {
                    eprintln!("failpoint {name}: sleeping {ms} ms");
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            }
            _ => {}
        }
    }
    #[cfg(any(test, feature = "failpoints"))]
    if armed::take(name) {
        return Err(Error::internal(format!("failpoint {name}"), "injected failure"));
    }
    let _ = name;
    Ok::<(), Error>(())
}
