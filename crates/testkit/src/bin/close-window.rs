//! Closes X11 windows by title the way a window manager's close button does, for end-to-end tests
//! under Xvfb, which runs no window manager (`tests/e2e/desktop.mjs`).
//!
//! `close-window TITLE` sends every window on `$DISPLAY` whose `_NET_WM_NAME` (or `WM_NAME`) is
//! exactly `TITLE` and that takes part in `WM_DELETE_WINDOW` (ICCCM 4.1.2.7) a `WM_PROTOCOLS` client
//! message asking it to close. The app decides what closing means (GTK reports a close request);
//! nothing is destroyed or killed from outside. Prints the number of windows asked; exits with 1
//! when there were none.

#[cfg(target_os = "linux")]
mod linux {
    use x11rb::connection::Connection as _;
    use x11rb::protocol::xproto::{
        Atom, AtomEnum, ClientMessageEvent, ConnectionExt as _, EventMask, Window,
    };
    use x11rb::rust_connection::RustConnection;
    use x11rb::{CURRENT_TIME, NONE};

    type Error = Box<dyn std::error::Error>;

    fn atom(conn: &RustConnection, name: &str) -> Result<Atom, Error> {
        Ok(conn.intern_atom(false, name.as_bytes())?.reply()?.atom)
    }

    /// A text property of `window`, or `None`.
    fn text(
        conn: &RustConnection,
        window: Window,
        property: Atom,
        kind: Atom,
    ) -> Result<Option<String>, Error> {
        let reply = conn
            .get_property(false, window, property, kind, 0, 1024)?
            .reply()?;
        Ok((reply.type_ != NONE).then(|| String::from_utf8_lossy(&reply.value).into_owned()))
    }

    /// The windows below `window` (all depths), `window` included. A window that goes away meanwhile
    /// (another client's, destroyed between the requests) is left out.
    fn tree(conn: &RustConnection, window: Window, found: &mut Vec<Window>) -> Result<(), Error> {
        found.push(window);
        let Ok(children) = conn.query_tree(window)?.reply() else {
            return Ok(());
        };
        for child in children.children {
            tree(conn, child, found)?;
        }
        Ok(())
    }

    /// Whether `window` is titled `title` and takes part in `WM_DELETE_WINDOW`.
    fn closable(conn: &RustConnection, window: Window, title: &str, atoms: &Atoms) -> Result<bool, Error> {
        let name = match text(conn, window, atoms.net_wm_name, atoms.utf8)? {
            Some(name) => Some(name),
            None => text(conn, window, AtomEnum::WM_NAME.into(), AtomEnum::STRING.into())?,
        };
        if name.as_deref() != Some(title) {
            return Ok(false);
        }
        Ok(conn
            .get_property(false, window, atoms.protocols, AtomEnum::ATOM, 0, 64)?
            .reply()?
            .value32()
            .is_some_and(|mut list| list.any(|a| a == atoms.delete)))
    }

    struct Atoms {
        net_wm_name: Atom,
        utf8: Atom,
        protocols: Atom,
        delete: Atom,
    }

    pub fn main() -> Result<(), Error> {
        let Some(title) = std::env::args().nth(1) else {
            return Err("usage: close-window TITLE".into());
        };
        let (conn, screen) = x11rb::connect(None)?;
        let root = conn.setup().roots[screen].root;
        let atoms = Atoms {
            net_wm_name: atom(&conn, "_NET_WM_NAME")?,
            utf8: atom(&conn, "UTF8_STRING")?,
            protocols: atom(&conn, "WM_PROTOCOLS")?,
            delete: atom(&conn, "WM_DELETE_WINDOW")?,
        };
        let mut windows = Vec::new();
        tree(&conn, root, &mut windows)?;
        let mut asked = 0;
        for window in windows {
            // a window destroyed since the tree was read answers with an error: not ours to close
            if !closable(&conn, window, &title, &atoms).unwrap_or(false) {
                continue;
            }
            let event =
                ClientMessageEvent::new(32, window, atoms.protocols, [atoms.delete, CURRENT_TIME, 0, 0, 0]);
            conn.send_event(false, window, EventMask::NO_EVENT, event)?;
            asked += 1;
        }
        conn.flush()?;
        eprintln!("close-window: asked {asked} window(s) titled {title:?} to close");
        if asked == 0 {
            return Err(format!("no window titled {title:?} takes WM_DELETE_WINDOW").into());
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("close-window: X11 only");
    std::process::exit(2);
}
