//! The page: mounts the app; all logic lives in the library's components.

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(compresslab_web::app::App);
}
