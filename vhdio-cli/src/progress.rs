//! `-p`: progress on stderr as qemu-img prints it, `    (12.00/100%)`,
//! rewritten in place with a carriage return, every whole percent.

use std::io::Write;

pub struct Progress {
    enabled: bool,
    /// Hundredths of a percent last printed.
    shown: Option<u64>,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        let mut p = Progress {
            enabled,
            shown: None,
        };
        p.print(0);
        p
    }

    /// `done` of `total` bytes are through.
    pub fn update(&mut self, done: u64, total: u64) {
        let hundredths = if total == 0 {
            10_000
        } else {
            (done.min(total) as u128 * 10_000 / total as u128) as u64
        };
        // Whole percents only, like qemu-img.
        if self.shown.is_none_or(|s| hundredths / 100 > s / 100) {
            self.print(hundredths);
        }
    }

    fn print(&mut self, hundredths: u64) {
        self.shown = Some(hundredths);
        if self.enabled {
            let mut e = std::io::stderr().lock();
            let _ = write!(
                e,
                "    ({}.{:02}/100%)\r",
                hundredths / 100,
                hundredths % 100
            );
            let _ = e.flush();
        }
    }

    /// 100% and a newline.
    pub fn finish(&mut self) {
        if self.enabled {
            self.print(10_000);
            eprintln!();
            self.enabled = false;
        }
    }
}
