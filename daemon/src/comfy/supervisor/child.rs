//! One ComfyUI child process: spawned in its own process group, its stdout and stderr copied line
//! by line into `tracing`, signalled as a whole group. Dropping a [`Child`] that has not been
//! reaped SIGKILLs its group, so no path leaves an orphan behind. It never waits on a full pipe:
//! the output is read by tasks of its own, whatever the supervisor is doing.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::config::SupervisorConfig;

/// Longest log line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 16 * 1024;
/// Lines of output kept for error reports.
const TAIL_LINES: usize = 40;

/// The last lines a child printed, newest last.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutputTail(Arc<Mutex<VecDeque<String>>>);

impl OutputTail {
    fn push(&self, line: String) {
        if let Ok(mut t) = self.0.lock() {
            if t.len() >= TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }

    /// The line that best explains an exit: the last one that looks like an error, else the last
    /// non-empty line.
    pub(crate) fn last_error_line(&self) -> Option<String> {
        let t = self.0.lock().ok()?;
        let non_empty = || t.iter().rev().filter(|l| !l.trim().is_empty());
        non_empty()
            .find(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("error")
                    || l.contains("exception")
                    || l.contains("address already in use")
            })
            .or_else(|| non_empty().next())
            .map(|l| l.trim().to_owned())
    }

    pub(crate) fn contains(&self, needle: &str) -> bool {
        self.0
            .lock()
            .map(|t| t.iter().any(|l| l.contains(needle)))
            .unwrap_or(false)
    }
}

/// Makes the child receive SIGKILL when the daemon dies, even by `kill -9` (Linux
/// `PR_SET_PDEATHSIG`). Without it a crashed daemon would leave ComfyUI running on its port, and
/// the restarted daemon could never start its own. (Shutdown in order still kills the whole
/// group; this covers the case where the daemon gets no chance to.)
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
    // getppid(2) and _exit(2), which are async-signal-safe; it allocates nothing and takes no
    // lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The daemon may have died between fork and prctl: then nobody would kill us.
            if nix::unistd::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut tokio::process::Command) {}

/// A running child and its process group.
#[derive(Debug)]
pub(crate) struct Child {
    inner: tokio::process::Child,
    pgid: Pid,
    pid: u32,
    /// Set once the child has been reaped and its group killed.
    reaped: bool,
    pub(crate) tail: OutputTail,
}

impl Child {
    /// Spawns `config.command` as the leader of a new process group.
    pub(crate) fn spawn(config: &SupervisorConfig, generation: u64) -> Result<Self, String> {
        let (program, args) = config
            .command
            .split_first()
            .ok_or_else(|| "command is empty".to_owned())?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &config.cwd {
            cmd.current_dir(cwd);
        }
        die_with_parent(&mut cmd);
        let mut inner = cmd.spawn().map_err(|e| {
            let cwd = config
                .cwd
                .as_ref()
                .map(|c| format!(" in {}", c.display()))
                .unwrap_or_default();
            format!("could not start {program:?}{cwd}: {e}")
        })?;
        let pid = inner
            .id()
            .ok_or_else(|| format!("{program:?} exited before its pid could be read"))?;
        let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
        let tail = OutputTail::default();
        if let Some(out) = inner.stdout.take() {
            tokio::spawn(pump(
                out,
                config.name.clone(),
                "stdout",
                generation,
                tail.clone(),
            ));
        }
        if let Some(err) = inner.stderr.take() {
            tokio::spawn(pump(
                err,
                config.name.clone(),
                "stderr",
                generation,
                tail.clone(),
            ));
        }
        tracing::info!(comfy = %config.name, pid, generation, command = ?config.command, "started ComfyUI");
        Ok(Self {
            inner,
            pgid: Pid::from_raw(raw),
            pid,
            reaped: false,
            tail,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to every process of the group; false when the group is already gone.
    pub(crate) fn signal_group(&self, signal: Signal) -> bool {
        if self.reaped {
            return false;
        }
        match killpg(self.pgid, signal) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(e) => {
                tracing::warn!(pgid = self.pid, %signal, error = %e, "could not signal ComfyUI's process group");
                false
            }
        }
    }

    /// Waits for the child to exit, then kills what is left of its group (grandchildren that
    /// outlived it). Cancel-safe.
    pub(crate) async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.inner.wait().await?;
        if !self.reaped {
            // The group id stays valid while any member lives; kill the stragglers now.
            let _ = killpg(self.pgid, Signal::SIGKILL);
            self.reaped = true;
        }
        Ok(status)
    }

    /// Non-blocking: `Some` once the child has exited.
    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        match self.inner.try_wait() {
            Ok(Some(status)) => {
                if !self.reaped {
                    let _ = killpg(self.pgid, Signal::SIGKILL);
                    self.reaped = true;
                }
                Some(status)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "could not poll ComfyUI's exit status");
                None
            }
        }
    }

    /// SIGKILLs the group and reaps the child (bounded: a process in uninterruptible sleep may
    /// outlive this by `wait_limit`).
    pub(crate) async fn kill(&mut self, wait_limit: Duration) -> Option<ExitStatus> {
        self.signal_group(Signal::SIGKILL);
        match tokio::time::timeout(wait_limit, self.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(e)) => {
                tracing::warn!(pid = self.pid, error = %e, "could not reap ComfyUI");
                None
            }
            Err(_) => {
                tracing::error!(
                    pid = self.pid,
                    "ComfyUI did not die within {wait_limit:?} of SIGKILL"
                );
                None
            }
        }
    }

    /// SIGINT to the group, then SIGKILL when it has not exited within `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if !self.signal_group(Signal::SIGINT) {
            return self.try_wait();
        }
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(e)) => {
                tracing::warn!(pid = self.pid, error = %e, "could not reap ComfyUI");
                self.kill(KILL_WAIT).await
            }
            Err(_) => {
                tracing::warn!(pid = self.pid, grace = ?grace, "ComfyUI ignored SIGINT; sending SIGKILL to its group");
                self.kill(KILL_WAIT).await
            }
        }
    }
}

/// How long to wait for the exit after a SIGKILL.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // Best effort: kill_on_drop only reaches the leader, not its children.
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Describes an exit status the way an operator reads it.
pub(crate) fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        format!("killed by signal {sig} ({name})")
    } else {
        format!("ended ({status})")
    }
}

/// Copies one output stream into the log, line by line, keeping a tail for error reports.
async fn pump<R: AsyncRead + Unpin>(
    stream: R,
    name: String,
    which: &'static str,
    generation: u64,
    tail: OutputTail,
) {
    let mut reader = BufReader::with_capacity(8 * 1024, stream);
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        line.clear();
        match read_line_capped(&mut reader, &mut line).await {
            Ok(0) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                tracing::info!(target: "kiln_daemon::comfy::output", comfy = %name, stream = which, generation, "{text}");
                tail.push(text.to_owned());
            }
            Err(e) => {
                tracing::warn!(comfy = %name, stream = which, error = %e, "could not read ComfyUI output");
                break;
            }
        }
    }
}

/// Reads one line into `buf`, keeping at most [`MAX_LINE`] bytes of it; returns the number of
/// bytes consumed (0 at end of stream).
async fn read_line_capped<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if done {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_capped_and_split_lines_kept() {
        let mut data = vec![b'a'; MAX_LINE * 3];
        data.extend_from_slice(b"\nsecond\nthird-without-newline");
        let mut reader = BufReader::with_capacity(1024, &data[..]);
        let mut buf = Vec::new();
        let n = read_line_capped(&mut reader, &mut buf).await.expect("read");
        assert_eq!(n, MAX_LINE * 3 + 1);
        assert_eq!(buf.len(), MAX_LINE);
        buf.clear();
        read_line_capped(&mut reader, &mut buf).await.expect("read");
        assert_eq!(buf, b"second\n");
        buf.clear();
        read_line_capped(&mut reader, &mut buf).await.expect("read");
        assert_eq!(buf, b"third-without-newline");
        buf.clear();
        assert_eq!(
            read_line_capped(&mut reader, &mut buf).await.expect("read"),
            0
        );
    }

    #[test]
    fn tail_prefers_the_error_line() {
        let tail = OutputTail::default();
        for l in [
            "Starting server",
            "OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8188): address already in use",
            "",
        ] {
            tail.push(l.to_owned());
        }
        let line = tail.last_error_line().expect("a line");
        assert!(line.contains("address already in use"), "{line}");
        assert!(tail.contains("Errno 98"));
        for i in 0..100 {
            tail.push(format!("line {i}"));
        }
        assert_eq!(tail.last_error_line().as_deref(), Some("line 99"));
    }
}
