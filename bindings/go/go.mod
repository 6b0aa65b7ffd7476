module github.com/libduplex/libduplex/bindings/go

go 1.19
