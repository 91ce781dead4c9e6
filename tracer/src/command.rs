//! `tracer -- COMMAND ARGS…`: start a command held before its first instruction, so it
//! can be traced from the start.
//!
//! The tracer forks; the child waits on a pipe until the tracer has registered its PID
//! with the kernel programs, then execs the command (keeping its PID). If the tracer
//! fails before that, the pipe closes unwritten and the child exits without running it.

use std::{ffi::CString, io, os::fd::RawFd, time::Duration};

use anyhow::{bail, Context as _, Result};

pub struct Launched {
    pub pid: u32,
    gate: Option<RawFd>,
    status: Option<i32>,
}

/// Exit status as a shell reports it: the code, or 128 + the signal that killed it.
fn decode(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

impl Launched {
    /// Forks the child that will run `argv` once released.
    pub fn spawn(argv: &[String]) -> Result<Self> {
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).with_context(|| format!("argument {a:?} contains a NUL byte")))
            .collect::<Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", io::Error::last_os_error());
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        let failed = c"tracer: could not run the command\n";
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", io::Error::last_os_error()),
            0 => unsafe {
                // The child: only async-signal-safe calls from here on.
                libc::close(write_end);
                let mut byte = 0u8;
                if libc::read(read_end, (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(127); // the tracer gave up before releasing us
                }
                libc::close(read_end);
                libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
                libc::write(2, failed.as_ptr().cast(), failed.to_bytes().len());
                libc::_exit(127);
            },
            pid => {
                unsafe { libc::close(read_end) };
                Ok(Self { pid: pid as u32, gate: Some(write_end), status: None })
            }
        }
    }

    /// Lets the command run.
    pub fn release(&mut self) -> Result<()> {
        if let Some(fd) = self.gate.take() {
            let n = unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
            unsafe { libc::close(fd) };
            if n != 1 {
                bail!("starting the command: {}", io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The command's exit status once it has exited.
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.status.is_none() {
            let mut status = 0;
            if unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) } == self.pid as i32 {
                self.status = Some(decode(status));
            }
        }
        self.status
    }

    /// Sends `signal`, then SIGKILL if it has not exited within `grace`; its status.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> i32 {
        if let Some(status) = self.try_wait() {
            return status;
        }
        unsafe { libc::kill(self.pid as i32, signal) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let mut status = 0;
        unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        self.status = Some(decode(status));
        self.status.unwrap_or(1)
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(fd) = self.gate.take() {
            // Never released: the child exits without running the command.
            unsafe { libc::close(fd) };
            let mut status = 0;
            unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_only_once_released_and_reports_the_status() {
        let mut l = Launched::spawn(&["sh".into(), "-c".into(), "exit 3".into()]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(l.try_wait(), None, "ran before it was released");
        l.release().unwrap();
        // Signal 0 only checks it exists: this waits for it to exit by itself.
        assert_eq!(l.stop(0, Duration::from_secs(5)), 3);
    }

    #[test]
    fn a_signal_is_reported_like_a_shell_does() {
        let mut l = Launched::spawn(&["sleep".into(), "10".into()]).unwrap();
        l.release().unwrap();
        assert_eq!(l.stop(libc::SIGTERM, Duration::from_secs(5)), 128 + libc::SIGTERM);
    }

    #[test]
    fn a_missing_program_exits_127() {
        let mut l = Launched::spawn(&["/nonexistent/program".into()]).unwrap();
        l.release().unwrap();
        assert_eq!(l.stop(0, Duration::from_secs(5)), 127);
    }
}
