fn main() {
    std::process::exit(dnatune::cli::main());
}
