// libduplex C++20 layer: the umbrella header. Header-only, over the C ABI.
#pragma once

#include <duplex/error.hpp>
#include <duplex/loop.hpp>
#include <duplex/task.hpp>
#include <duplex/tls.hpp>
#include <duplex/conn.hpp>
#include <duplex/listener.hpp>
#include <duplex/channel.hpp>
#include <duplex/timer.hpp>
#include <duplex/group.hpp>
