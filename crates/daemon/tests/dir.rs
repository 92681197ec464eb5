//! The ancestor rule of `own_dir` and `check_socket` on real directories. The cases with another
//! user's files need root (to chown); they skip otherwise and fail under CI=true.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sigil_daemon::{DirError, check_socket, own_dir};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    sigil_test_util::can_run_as_root("this test (chown to another user)")
}

fn chown_nobody(p: &Path) {
    std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).expect("lchown");
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
}

#[test]
fn creates_missing_directories_with_safe_modes() {
    let root = tempfile::tempdir().expect("tempdir");
    let leaf = root.path().join("run/sigil/agent/private");
    own_dir(&leaf, 0o700).expect("created");
    assert_eq!(mode(&root.path().join("run")), 0o755);
    assert_eq!(mode(&root.path().join("run/sigil/agent")), 0o755);
    assert_eq!(mode(&leaf), 0o700);
    // Idempotent, and `..` resolves against real directories.
    own_dir(&root.path().join("run/sigil/agent/../agent/private"), 0o700).expect("again");
    // A `..` after a directory that does not exist would make the created path ambiguous.
    assert!(matches!(
        own_dir(&root.path().join("run/sigil/x/../y"), 0o700),
        Err(DirError::DotDotInMissing { .. })
    ));
    // Our own directory with the wrong mode is corrected; a shared one is refused, not re-permissioned.
    std::fs::set_permissions(&leaf, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    own_dir(&leaf, 0o700).expect("fixed");
    assert_eq!(mode(&leaf), 0o700);
    std::fs::set_permissions(&leaf, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let e = own_dir(&leaf, 0o700).expect_err("shared leaf");
    assert!(matches!(e, DirError::SharedDirectory { .. }), "{e}");
    assert_eq!(mode(&leaf), 0o1777);
}

#[test]
fn symlink_loops_and_a_symlinked_leaf_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::os::unix::fs::symlink(&b, &a).expect("symlink");
    std::os::unix::fs::symlink(&a, &b).expect("symlink");
    let e = own_dir(&a.join("x"), 0o700).expect_err("loop");
    assert!(matches!(e, DirError::SymlinkLoop { .. }), "{e}");
    let real = root.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let link = root.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let e = own_dir(&link, 0o700).expect_err("symlinked leaf");
    assert!(matches!(e, DirError::NotADirectory { .. }), "{e}");
    // A link on the way, in a directory of ours, to a directory of ours is followed.
    own_dir(&link.join("sub"), 0o700).expect("through our link");
    assert!(real.join("sub").is_dir());
}

#[test]
fn ancestors_of_another_user_or_shared_without_sticky_bit_are_refused() {
    if !is_root() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    // Owned by another user.
    let theirs = root.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    chown_nobody(&theirs);
    let e = own_dir(&theirs.join("sock"), 0o700).expect_err("foreign ancestor");
    let msg = e.to_string();
    assert!(
        matches!(e, DirError::UntrustedAncestor { owner: NOBODY, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&theirs.display().to_string()) && msg.contains("uid 65534"),
        "{msg}"
    );
    assert!(!theirs.join("sock").exists());
    // Group-writable, root's, no sticky bit.
    let group = root.path().join("group");
    std::fs::create_dir(&group).expect("mkdir");
    std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    let e = own_dir(&group.join("sock"), 0o700).expect_err("group-writable ancestor");
    assert!(
        matches!(e, DirError::SharedAncestor { mode: 0o770, .. }),
        "{e}"
    );
    // Sticky and shared (like /tmp): our directory below counts, another user's does not, and
    // neither does another user's symlink even to our own directory.
    let sticky = root.path().join("sticky");
    std::fs::create_dir(&sticky).expect("mkdir");
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    own_dir(&sticky.join("mine/sock"), 0o700).expect("ours below a sticky dir");
    let planted = sticky.join("planted");
    std::fs::create_dir(&planted).expect("mkdir");
    chown_nobody(&planted);
    assert!(matches!(
        own_dir(&planted.join("sock"), 0o700),
        Err(DirError::UntrustedAncestor { .. })
    ));
    let link = sticky.join("link");
    std::os::unix::fs::symlink(sticky.join("mine"), &link).expect("symlink");
    own_dir(&link.join("sock2"), 0o700).expect("our link in a sticky dir");
    chown_nobody(&link);
    let e = own_dir(&link.join("sock3"), 0o700).expect_err("their link");
    assert!(e.to_string().contains(&link.display().to_string()), "{e}");
    // Our own link into their directory.
    let into = root.path().join("into");
    std::os::unix::fs::symlink(&theirs, &into).expect("symlink");
    let e = own_dir(&into.join("sock"), 0o700).expect_err("link into theirs");
    assert!(e.to_string().contains(&theirs.display().to_string()), "{e}");
    // The leaf itself must be ours.
    let e = own_dir(&theirs, 0o700).expect_err("their leaf");
    assert!(matches!(e, DirError::ForeignOwner { .. }), "{e}");
}

#[test]
fn client_socket_check() {
    let root = tempfile::tempdir().expect("tempdir");
    let sock = root.path().join("api.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    check_socket(&sock).expect("our socket");
    assert!(matches!(
        check_socket(&root.path().join("none.sock")),
        Err(DirError::MissingSocket { .. })
    ));
    let file = root.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    assert!(matches!(
        check_socket(&file),
        Err(DirError::NotASocket { .. })
    ));
    let link = root.path().join("link.sock");
    std::os::unix::fs::symlink(&sock, &link).expect("symlink");
    assert!(matches!(
        check_socket(&link),
        Err(DirError::NotASocket { .. })
    ));
    if !is_root() {
        return;
    }
    chown_nobody(&sock);
    let e = check_socket(&sock).expect_err("their socket");
    let msg = e.to_string();
    assert!(
        matches!(e, DirError::UntrustedSocket { owner: NOBODY, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&sock.display().to_string()) && msg.contains("uid 65534"),
        "{msg}"
    );
}
